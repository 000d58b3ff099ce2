"""launch/demo_select.py: its validation metrics and probe on a hand-made workdir."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
sys.path.insert(0, LAUNCH)

import demo_select  # noqa: E402  pylint: disable=g-import-not-at-top


def _workdir(tmp_path, separable):
  """40 cells (ids 0-3 abnormal), two validation bags of 6 and one test bag."""
  (tmp_path / "bags").mkdir(parents=True)
  (tmp_path / "embeddings").mkdir()
  (tmp_path / "mil").mkdir()
  cells = [{"id": i, "label": int(i < 4)} for i in range(40)]
  (tmp_path / "bags" / "manifest.json").write_text(json.dumps({"cells": cells}))
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(40, 4))
  if separable:
    emb[:4, 0] += 20.0
  for b in range(4):
    ids = np.arange(10 * b, 10 * b + 10)
    np.savez(tmp_path / "embeddings" / f"train-{b:03d}.npz", embeddings=emb[ids], cell_ids=ids)
  np.savez(tmp_path / "embeddings" / "test-000.npz", embeddings=rng.normal(size=(2, 4)) + 99, cell_ids=np.array([0, 1]))
  # val bag 0 positive: cells 0, 1 witnesses; attention puts cell 0 first, cell 1 sixth of 6.
  # val bag 1 negative; test bag positive (must be ignored).
  cell_ids = np.array([0, 4, 5, 6, 7, 1, 8, 9, 10, 11, 12, 13, 2, 3])
  attention = np.array([.9, .5, .4, .3, .2, .1, .1, .1, .1, .1, .1, .1, .9, .9])
  np.savez(tmp_path / "mil" / "predictions.npz", split=np.array(["val", "val", "test"]),
           label=np.array([1, 0, 1]), prob=np.array([0.7, 0.2, 0.1]),
           offsets=np.array([0, 6, 12, 14]), cell_ids=cell_ids, attention=attention)
  return str(tmp_path)


def test_validation_metrics_read_only_validation_bags(tmp_path):
  auc, recall, n_val = demo_select.validation_metrics(_workdir(tmp_path, True))
  assert n_val == 2
  assert auc == 1.0
  assert recall == 0.5  # cell 0 in the top 5, cell 1 ranked sixth


def test_probe_separates_separable_cells_and_not_noise(tmp_path):
  assert demo_select.probe_auc(_workdir(tmp_path / "a", True)) == 1.0
  noise = demo_select.probe_auc(_workdir(tmp_path / "b", False))
  assert noise < 0.9
