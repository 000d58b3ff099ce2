"""Progress display: a tqdm bar on a terminal, a plain line every ~10 s in a log file.

tqdm redraws its bar many times a second; written to a file (a batch job's log, a
sweep's ``sweep.log``) those redraws pile up (a 90 s run wrote about 1 MB of them). When
stderr is not a terminal, ``progress`` returns ``LineProgress`` instead: the same small
API (iterate, ``update``, ``set_postfix``, ``close``) printing one newline-terminated line
at most every ``interval`` seconds, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, TextIO

LOG_INTERVAL_S = 10.0


class LineProgress:
  """tqdm's subset used here, as one ``desc: n/total unit (p %), rate, postfix`` line per interval."""

  def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
               unit: str = "it", initial: int = 0, disable: bool = False, interval: float = LOG_INTERVAL_S,
               file: TextIO | None = None, clock=time.monotonic):
    self.iterable = iterable
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
    self.disable, self.interval, self.file, self.clock = disable, float(interval), file, clock
    self.postfix = ""
    self._t0 = self._last = clock()
    self._n0 = self.n
    self._closed = False

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def __len__(self):
    return self.total or 0

  def set_postfix(self, refresh: bool = True, **kwargs: Any) -> None:
    del refresh
    self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

  def line(self) -> str:
    elapsed = max(self.clock() - self._t0, 1e-9)
    done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
    rate = (self.n - self._n0) / elapsed
    text = f"{self.desc}: {done} {self.unit}{pct}, {rate:.2f} {self.unit}/s, {elapsed:.0f} s"
    return text + (f", {self.postfix}" if self.postfix else "")

  def _emit(self) -> None:
    out = self.file or sys.stderr
    out.write(self.line() + "\n")
    out.flush()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = self.clock()
    if not self.disable and now - self._last >= self.interval:
      self._last = now
      self._emit()

  def close(self) -> None:
    if not self._closed and not self.disable:
      self._emit()
    self._closed = True


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, file: TextIO | None = None, **tqdm_kwargs: Any):
  """A tqdm bar when ``file`` (stderr) is a terminal, else a ``LineProgress``.

  ``tqdm_kwargs`` (e.g. ``leave``) go to tqdm only.
  """
  out = file or sys.stderr
  isatty = getattr(out, "isatty", None)
  if isatty is not None and isatty():
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=out,
                **tqdm_kwargs)
  return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file)
