"""runtime.loop: the order of a loop's side duties, on a fake step (no jax)."""

import signal

import pytest

from slamags_jax.runtime import loop, preemption


class FakeCheckpointer:
  where = "/ckpt"

  def __init__(self, events, decline=()):
    self.events, self.decline = events, set(decline)

  def save(self, step, state, *, force=False):
    if step in self.decline and not force:
      self.events.append(("declined", step))
      return False
    self.events.append(("save", step, state, force))
    return True

  def wait(self):
    self.events.append(("wait",))


class FakeGuard:
  def __init__(self, at=None):
    self.at = at

  def reached(self, step):
    return step == self.at

  def stop(self, what):
    return preemption.Preempted(signal.SIGTERM, what)


def _run(events, schedule, start=0, guard=None, decline=()):
  return loop.run_steps(
      start, start=start, schedule=schedule, step_fn=lambda s, b: (s + 1, {"m": s + 1}),
      next_batch=lambda: None, on_metrics=lambda step, m: events.append(("metrics", step, m["m"])),
      on_epoch_end=lambda step, s: events.append(("epoch", step, s)),
      checkpointer=FakeCheckpointer(events, decline), guard=guard or FakeGuard())


def test_metrics_lag_one_step_except_at_boundaries():
  events = []
  final = _run(events, loop.Schedule(num_steps=5, steps_per_epoch=3, checkpoint_every=4))
  assert final == 5
  assert events == [("metrics", 1, 1), ("metrics", 2, 2),          # step 2's metrics after step 3 runs
                    ("metrics", 3, 3), ("epoch", 3, 3),             # epoch end: at once, then the epoch action
                    ("metrics", 4, 4), ("save", 4, 4, False),       # checkpoint step
                    ("metrics", 5, 5), ("save", 5, 5, False)]       # the last step always saves


def test_resume_starts_after_the_restored_step():
  events = []
  assert _run(events, loop.Schedule(num_steps=4, steps_per_epoch=2, checkpoint_every=10), start=2) == 4
  assert [e[:2] for e in events] == [("metrics", 3), ("metrics", 4), ("epoch", 4), ("save", 4)]


def test_a_signal_saves_the_step_once_and_raises():
  events = []
  with pytest.raises(preemption.Preempted, match="finished step 2 of 6 and saved its checkpoint in /ckpt"):
    _run(events, loop.Schedule(num_steps=6, steps_per_epoch=3, checkpoint_every=10), guard=FakeGuard(at=2))
  assert events == [("metrics", 1, 1), ("metrics", 2, 2), ("save", 2, 2, True), ("wait",)]


def test_a_signal_at_a_saved_step_does_not_save_twice():
  events = []
  with pytest.raises(preemption.Preempted):
    _run(events, loop.Schedule(num_steps=6, steps_per_epoch=3, checkpoint_every=2), guard=FakeGuard(at=2))
  assert [e[0] for e in events].count("save") == 1


def test_a_declined_save_is_forced_on_a_signal():
  events = []
  with pytest.raises(preemption.Preempted):
    _run(events, loop.Schedule(num_steps=6, steps_per_epoch=3, checkpoint_every=2), guard=FakeGuard(at=2),
         decline={2})
  assert ("declined", 2) in events and ("save", 2, 2, True) in events


def test_non_finite_streak():
  streak = loop.NonFiniteStreak(limit=2, start=1)
  assert streak.update(False) == 2 and streak.exceeded
  assert streak.update(True) == 0 and not streak.exceeded
