"""The one metric writer of the training loops: JSONL from process 0, optionally TensorBoard.

Every training loop (pretraining, MIL) writes its records through a ``MetricWriter``:
one JSON line per record in ``metrics.jsonl`` (what the report, the sweep and users read),
written by process 0 only (``runtime.parallel.is_writer``). With ``tensorboard=True`` (the
config key ``tensorboard``) the numeric fields of each record also go to TensorBoard event
files in the same folder, through ``tensorboardX`` (the ``tensorboard`` extra: ``pip install
-e ".[tensorboard]"``), so ``tensorboard --logdir <workdir>`` shows every stage's curves.

Example::

  writer = MetricWriter("/tmp/run/pretrain/metrics.jsonl", enabled=True)
  writer.write({"kind": "step", "step": 1, "loss": 0.7})
  writer.close()
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError


def _event_writer(folder: str) -> Any:
  try:
    import tensorboardX
  except ImportError as e:
    raise UserError("tensorboard=true needs tensorboardX: pip install -e \".[tensorboard]\"") from e
  return tensorboardX.SummaryWriter(logdir=folder, flush_secs=30)


class MetricWriter:
  """Appends records to a JSONL file (process 0 only), and their scalars to TensorBoard when asked."""

  def __init__(self, path: str, *, enabled: bool = True, tensorboard: bool = False, step_key: str = "step"):
    self.path = path
    self.enabled = enabled
    self.step_key = step_key
    self._events = _event_writer(os.path.dirname(os.path.abspath(path))) if (enabled and tensorboard) else None

  def write(self, record: dict[str, Any]) -> None:
    """One record: a JSON line; numeric fields as TensorBoard scalars (``<kind>/<field>``) at its step."""
    if not self.enabled:
      return
    fileio.append_jsonl(self.path, record)
    if self._events is not None:
      step = int(record.get(self.step_key, 0) or 0)
      kind = record.get("kind", "")
      for name, value in record.items():
        if name in (self.step_key, "kind") or isinstance(value, bool) or not isinstance(value, numbers.Real):
          continue
        if math.isfinite(float(value)):
          self._events.add_scalar(f"{kind}/{name}" if kind else name, float(value), step)

  def reset(self) -> None:
    """Starts the JSONL file afresh (a run that starts from scratch)."""
    if self.enabled and os.path.exists(self.path):
      os.unlink(self.path)

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None
