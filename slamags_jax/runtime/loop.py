"""A short training loop whose side duties are small objects (in the manner of clu's periodic actions).

``run_steps`` only orders things: dispatch a step, hand the previous step's metrics to
the host (so the host never waits on the step in flight), and at the step boundaries of a
``Schedule`` run the epoch actions (e.g. the probe), save a checkpoint and ask the
preemption guard whether to stop. What happens at each point is the caller's: a metrics
handler, an epoch action, a ``Checkpointer``. ``NonFiniteStreak`` counts consecutive
skipped (non-finite) steps for the handler.

Resume is exact by construction: a step's batch comes only from the data iterator (whose
position is checkpointed with the state), and the state holds every counter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from absl import logging

from slamags_jax.runtime import preemption


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the periodic duties run: epoch ends, checkpoints (and always the last step)."""
  num_steps: int
  steps_per_epoch: int
  checkpoint_every: int

  def epoch_end(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def checkpoint(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.num_steps

  def boundary(self, step: int) -> bool:
    """A step whose metrics are handled at once (the host waits for it)."""
    return self.checkpoint(step) or self.epoch_end(step)


class Checkpointer(Protocol):
  """What ``run_steps`` saves through: ``save`` may decline (returns False), ``where`` names the folder."""
  where: str

  def save(self, step: int, state: Any, *, force: bool = False) -> bool: ...

  def wait(self) -> None: ...


class NonFiniteStreak:
  """Consecutive non-finite (skipped) steps; ``update`` returns the streak after a step."""

  def __init__(self, limit: int, start: int = 0):
    self.limit, self.count = int(limit), int(start)

  def update(self, finite: bool) -> int:
    self.count = 0 if finite else self.count + 1
    return self.count

  @property
  def exceeded(self) -> bool:
    return self.count >= self.limit


def run_steps(state: Any, *, start: int, schedule: Schedule, step_fn: Callable[[Any, Any], tuple[Any, Any]],
              next_batch: Callable[[], Any], on_metrics: Callable[[int, Any], None],
              on_epoch_end: Callable[[int, Any], None], checkpointer: Checkpointer,
              guard: preemption.Guard) -> Any:
  """Steps ``start + 1 .. schedule.num_steps``; returns the final state.

  Order per step: dispatch; handle the previous step's metrics; at a boundary handle this
  step's metrics, run ``on_epoch_end`` at an epoch's end and save at a checkpoint step;
  then ask ``guard``: on a signal, the step is saved (if it was not) and ``Preempted`` is
  raised after the save completes.
  """
  pending, saved = None, start
  for step in range(start + 1, schedule.num_steps + 1):
    state, metrics = step_fn(state, next_batch())
    if pending is not None:
      on_metrics(*pending)
    pending = (step, metrics)
    if schedule.boundary(step):
      on_metrics(*pending)
      pending = None
      if schedule.epoch_end(step):
        on_epoch_end(step, state)
      if schedule.checkpoint(step) and checkpointer.save(step, state):
        saved = step
    if guard.reached(step):
      if pending is not None:
        on_metrics(*pending)
      if saved != step:
        checkpointer.save(step, state, force=True)
      checkpointer.wait()
      stop = guard.stop(f"finished step {step} of {schedule.num_steps} and saved its checkpoint in "
                        f"{checkpointer.where}")
      logging.warning("%s", stop)
      raise stop
  if pending is not None:
    on_metrics(*pending)
  return state
