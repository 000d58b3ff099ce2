"""tools/faults.py's comparison: timing fields ignored, any other change caught.

The fault runs themselves (kill -9 / SIGTERM and reruns) are in tests/test_reliability.py
(pretraining, the CLI), tests/test_preemption.py (MIL), tests/test_ioerrors.py (a full
disk) and tests/test_workdir_lock.py; the long form is `python -m tools.faults --kills N`.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from slamags_jax.runtime import fileio
from tools import faults


def _workdir(root, wall: float, prob: np.ndarray):
  fileio.write_json(os.path.join(root, "bags", "manifest.json"), {"bags": [1, 2]})
  fileio.write_json(os.path.join(root, "pretrain", "summary.json"), {"param_l2": 3.5, "wall_s": wall})
  for step in (1, 2):
    fileio.append_jsonl(os.path.join(root, "pretrain", "metrics.jsonl"), {"step": step, "loss": 1.0 / step,
                                                                          "images_per_s": wall * step})
  fileio.save_npz(os.path.join(root, "mil", "predictions.npz"), prob=prob, ids=np.array(["a", "b"]))
  fileio.write_text(os.path.join(root, "report", "report.md"), f"# r\n| pretraining wall time (s) | {wall} |\nF1 0.5\n")


def test_compare_ignores_timing_and_catches_any_other_change(tmp_path):
  prob = np.array([0.25, np.nan])
  ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
  _workdir(ref, 1.0, prob)
  _workdir(work, 7.0, prob.copy())
  assert faults.compare(ref, work) == (5, [])
  bumped = prob.copy()
  bumped[0] = np.nextafter(bumped[0], 1.0)  # one ulp
  fileio.save_npz(os.path.join(work, "mil", "predictions.npz"), prob=bumped, ids=np.array(["a", "b"]))
  assert faults.compare(ref, work) == (5, ["mil/predictions.npz"])
  shutil.rmtree(os.path.join(work, "bags"))
  n, differ = faults.compare(ref, work)
  assert n == 5 and differ[0].startswith("bags/manifest.json (FileNotFoundError")


def test_faults_knows_the_stages_and_markers_of_main():
  from slamags_jax import config, main
  assert faults.STAGES == config.STAGES and faults.MARKERS == main.MARKERS
