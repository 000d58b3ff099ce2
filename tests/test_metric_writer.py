"""runtime.metric_writer: JSONL from the writing process, TensorBoard events when asked."""

import glob
import os

import pytest

from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError
from slamags_jax.runtime.metric_writer import MetricWriter


def test_jsonl_lines_and_reset(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = MetricWriter(path)
  w.write({"kind": "step", "step": 1, "loss": 0.5})
  w.write({"kind": "epoch", "step": 2, "loss": None})
  assert fileio.read_jsonl(path) == [{"kind": "step", "step": 1, "loss": 0.5},
                                     {"kind": "epoch", "step": 2, "loss": None}]
  w.reset()
  assert not os.path.exists(path)
  w.close()


def test_a_process_that_does_not_write_writes_nothing(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  MetricWriter(path, enabled=False, tensorboard=True).write({"step": 1, "loss": 0.5})
  assert not os.listdir(tmp_path)


def test_tensorboard_events_hold_the_numeric_fields(tmp_path):
  pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
  path = str(tmp_path / "metrics.jsonl")
  w = MetricWriter(path, tensorboard=True)
  w.write({"kind": "step", "step": 3, "loss": 0.25, "skipped": 0, "note": "x", "nan": float("nan")})
  w.close()
  events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_tensorboard_without_the_extra_is_one_clear_error(tmp_path, monkeypatch):
  import builtins
  real = builtins.__import__

  def no_tensorboardx(name, *a, **k):
    if name == "tensorboardX":
      raise ImportError(name)
    return real(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
  with pytest.raises(UserError, match="tensorboard extra|tensorboardX"):
    MetricWriter(str(tmp_path / "m.jsonl"), tensorboard=True)
