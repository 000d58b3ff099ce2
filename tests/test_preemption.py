"""Preemption: the signal guard, snapshots, and a SIGTERM in MIL training resumed exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_mil import clustered_bags, write_embeddings

from slamags_jax import config, mil
from slamags_jax.runtime import checkpoints, fileio, preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_guard_turns_the_signal_into_a_flag_and_restores_the_handlers(signum, code):
  before = signal.getsignal(signum)
  with preemption.Guard() as guard:
    assert not guard.reached(1)
    os.kill(os.getpid(), signum)  # delivered to this (main) thread: the handler runs at once
    assert guard.signum == signum and guard.reached(2)
    stop = guard.stop("saved step 2")
  assert signal.getsignal(signum) is before
  assert stop.exit_code == code and str(stop) == (f"{preemption.NAMES[signum]} received: saved step 2; rerun the "
                                                  "same command to continue")


def test_a_signal_after_the_last_check_gets_its_default_action():
  code = ("import os, signal, time; from slamags_jax.runtime import preemption\n"
          "g = preemption.Guard().install()\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.1)\n"
          "print('still here', flush=True)\ng.restore()\nprint('not reached', flush=True)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == -signal.SIGTERM and r.stdout == "still here\n"


def test_snapshot_round_trip_and_mismatch(tmp_path):
  trees = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": (np.int32(7), np.zeros(2, np.uint32))}
  path = str(tmp_path / "snapshot")
  checkpoints.save_snapshot(path, trees, {"step": 3, "best": [-float("inf"), 0.5]})
  got, progress = checkpoints.load_snapshot(path, trees)
  assert progress == {"step": 3, "best": [-float("inf"), 0.5]}
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(trees)):
    np.testing.assert_array_equal(x, y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
  with pytest.raises(ValueError, match="do not match"):
    checkpoints.load_snapshot(path, {"a": np.zeros((3, 2), np.float32), "b": trees["b"]})


def _mil_workdir(root) -> str:
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(6, 8))
  bags = (clustered_bags(rng, 10, dim=8, centres=centres) + clustered_bags(rng, 4, dim=8, centres=centres, prefix="v",
                                                                           split="val")
          + clustered_bags(rng, 4, dim=8, centres=centres, prefix="t", split="test"))
  os.makedirs(root)
  write_embeddings(str(root), bags, 8)
  return str(root)


def _mil_config():
  cfg = config.get_base_config()
  cfg.mil.model, cfg.mil.epochs, cfg.mil.hidden_dim, cfg.mil.attention_dim = "abmil", 3, 8, 4
  cfg.mil.bags_per_step = 3
  cfg.mil.dropout = 0.1  # the dropout keys must continue too
  return cfg


_TIMING = ("train_s", "wall_s", "train_wall_s", "train_bags_per_s", "infer_bags_per_s")


def _outputs(workdir) -> tuple[dict, list, dict]:
  out = os.path.join(workdir, "mil")
  summary = {k: v for k, v in fileio.read_json(os.path.join(out, "summary.json")).items() if k not in _TIMING}
  records = fileio.read_jsonl(os.path.join(out, "metrics.jsonl"))
  lines = [{k: v for k, v in r.items() if k not in _TIMING} for r in records]
  with np.load(os.path.join(out, "predictions.npz")) as z:
    preds = {k: z[k] for k in z.files}
  return summary, lines, preds


@pytest.mark.e2e
def test_sigterm_in_mil_training_saves_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
  cfg = _mil_config()
  full = _mil_workdir(tmp_path / "full")
  mil.run(cfg, full)

  work = _mil_workdir(tmp_path / "preempted")
  real = preemption.Guard.reached
  at = 6  # mid-epoch 2 (4 steps per epoch)

  def reached(self, step):
    if step == at:
      os.kill(os.getpid(), signal.SIGTERM)  # the real signal, through the real handler
    return real(self, step)

  monkeypatch.setattr(preemption.Guard, "reached", reached)
  with pytest.raises(preemption.Preempted) as e:
    mil.run(cfg, work)
  assert e.value.exit_code == 143
  assert f"finished MIL step {at} (epoch 2)" in str(e.value)
  assert os.path.exists(os.path.join(work, "mil", mil.stage.RESUME_FILE))
  assert not os.path.exists(os.path.join(work, "mil", "summary.json"))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  # The snapshot fits only the settings and embeddings it was made from.
  path = os.path.join(work, "mil", mil.stage.RESUME_FILE)
  length = mil.bucket_length(max(b["embeddings"].shape[0] for b in mil.load_embedded_bags(work)))
  other = _mil_config()
  other.mil.lr = 2e-3
  assert mil.stage._load_resume(path, mil.stage._fingerprint(other, work, length), other.mil, 8) is None
  resumed = mil.stage._load_resume(path, mil.stage._fingerprint(cfg, work, length), cfg.mil, 8)
  assert resumed is not None and resumed[1]["global_step"] == at

  at = -1
  mil.run(cfg, work)  # the rerun continues from step 6
  assert not os.path.exists(os.path.join(work, "mil", mil.stage.RESUME_FILE))
  (sa, la, pa), (sb, lb, pb) = _outputs(full), _outputs(work)
  assert sb == sa and lb == la
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pb[k], pa[k])
