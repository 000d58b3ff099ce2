"""Progress lines: a plain line at most every interval when stderr is not a terminal."""

import io

from slamags_jax.runtime import progress


class Clock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_log_file_gets_a_line_per_interval_not_per_update():
  out, clock = io.StringIO(), Clock()
  bar = progress.LineProgress(total=1000, desc="pretrain", unit="step", file=out, interval=10.0, clock=clock)
  for _ in range(1000):
    clock.t += 0.1  # 100 s in all
    bar.update(1)
    bar.set_postfix(loss="1.0")
  bar.close()
  lines = out.getvalue().splitlines()
  assert 9 <= len(lines) <= 11  # one per 10 s, plus the final one; no carriage-return redraws
  assert "\r" not in out.getvalue()
  assert lines[-1].startswith("pretrain: 1000/1000 step (100 %)") and "loss=1.0" in lines[-1]


def test_iterating_and_non_terminal_choice():
  out = io.StringIO()  # not a terminal
  bar = progress.progress(range(5), desc="mil", unit="epoch", file=out)
  assert isinstance(bar, progress.LineProgress)
  assert list(bar) == [0, 1, 2, 3, 4]
  assert out.getvalue().splitlines()[-1].startswith("mil: 5/5 epoch")
  quiet = io.StringIO()
  for _ in progress.progress(range(3), file=quiet, disable=True):
    pass
  assert quiet.getvalue() == ""
