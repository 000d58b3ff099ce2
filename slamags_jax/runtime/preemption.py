"""Preemption: SIGTERM / SIGINT stop a training loop after a step, which it checkpoints.

Preemptible VMs and SLURM stop a job with SIGTERM and a short notice (~30 s); Ctrl-C
sends SIGINT. Inside a ``Guard`` either signal only sets a flag; the loop asks
``guard.reached(step)`` after each step and, when it answers True, saves a checkpoint of
that step, logs one line and raises ``Preempted``, which ``main`` turns into exit
status 143 (SIGTERM) or 130 (SIGINT), the statuses the default handlers would give. The
rerun of the same command continues from that checkpoint exactly. A second signal while
the first is being handled gets the default action (the process stops at once).

Multi-host: every process must save the same step. With several processes
``reached`` is jax's ``multihost_utils.reached_preemption_sync_point``: the
distributed runtime's preemption service catches SIGTERM on any process (its own
handler, installed by ``jax.distributed.initialize``; the guard leaves SIGTERM to it),
propagates the notice and returns True on every process at the same step. A SIGINT is
handed to that service by re-sending it to the process as SIGTERM. One process (the
case tested here) reads its own flag and costs nothing per step. The multi-process path
has not been run (no multi-host machine); see README.
"""

from __future__ import annotations

import signal
from typing import Any

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Preempted(Exception):
  """A loop stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = int(signum)
    self.exit_code = 128 + int(signum)


def _multi_process() -> bool:
  import jax  # keeps this module light for main
  return jax.process_count() > 1


class Guard:
  """SIGTERM and SIGINT set ``signum`` instead of stopping the process, from ``install()`` to ``restore()``.

  (Also a context manager.) ``reached(step)`` must be called after every step, on every
  process. ``restore()`` puts the previous handlers back; a signal that arrived after
  the last ``reached`` call, and so was not acted upon, then gets its default action
  (the process stops as if no guard had been there; the rerun repeats the work since
  the loop's last checkpoint).
  """

  def __init__(self):
    self.signum: int | None = None
    self.acted = False
    self._old: dict[int, Any] = {}
    self._multi = False

  def _handler(self, signum, frame):
    if self.signum is not None:  # a second signal: the default action, now
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.signum = signum
    if self._multi and signum != signal.SIGTERM:
      signal.raise_signal(signal.SIGTERM)  # to the preemption service (see the module docstring)

  def install(self) -> "Guard":
    self._multi = _multi_process()
    wanted = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for s in wanted:
      self._old[s] = signal.signal(s, self._handler)
    return self

  def restore(self) -> None:
    for s, old in self._old.items():
      signal.signal(s, old if old is not None else signal.SIG_DFL)
    self._old.clear()
    if self.signum is not None and not self.acted:
      signal.raise_signal(self.signum)  # now with the handler that was there before the guard

  def __enter__(self) -> "Guard":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def reached(self, step: int) -> bool:
    """True when the loop should save ``step`` and stop (the same step on every process)."""
    if self._multi:
      from jax.experimental import multihost_utils
      hit = multihost_utils.reached_preemption_sync_point(int(step))
      if hit and self.signum is None:
        self.signum = signal.SIGTERM  # another process got the notice
    else:
      hit = self.signum is not None
    self.acted = self.acted or hit
    return hit

  def stop(self, what: str) -> Preempted:
    """The exception to raise once ``what`` (e.g. "saved the checkpoint of step 7 in ...") is done."""
    name = NAMES.get(self.signum, str(self.signum))
    return Preempted(self.signum or signal.SIGTERM, f"{name} received: {what}; rerun the same command to continue")
