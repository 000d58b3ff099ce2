"""tools/studies/demo_select.py: its probe and its row on a hand-made workdir (no training)."""

from __future__ import annotations

import json

import numpy as np

from slamags_jax import bags
from tools.studies import demo_select


def _workdir(path, separable):
  """40 train-pool cells (ids 0-3 abnormal) in 4 train bags, and one test bag of cells 0-1
  whose embeddings would make any probe perfect if it read them."""
  for sub in ("bags", "embeddings", "report"):
    (path / sub).mkdir(parents=True)
  cells = [{"id": i, "label": int(i < 4), "path": f"c{i}.png"} for i in range(40)]
  (path / "bags" / "manifest.json").write_text(json.dumps({"format": bags.FORMAT, "cells": cells, "bags": []}))
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(40, 4)).astype(np.float32)
  if separable:
    emb[:4, 0] += 20.0
  index = []
  for b in range(4):
    ids = np.arange(10 * b, 10 * b + 10)
    np.savez(path / "embeddings" / f"train-{b:03d}.npz", embeddings=emb[ids], cell_ids=ids)
    index.append({"id": f"train-{b:03d}", "split": "train", "label": int(b == 0), "file": f"train-{b:03d}.npz"})
  test = np.where(np.arange(2)[:, None] == 0, 50.0, -50.0) * np.ones((2, 4))
  np.savez(path / "embeddings" / "test-000.npz", embeddings=test.astype(np.float32), cell_ids=np.array([0, 1]))
  index.append({"id": "test-000", "split": "test", "label": 1, "file": "test-000.npz"})
  (path / "embeddings" / "index.json").write_text(json.dumps({"dim": 4, "bags": index}))
  (path / "report" / "summary.json").write_text(json.dumps({
      "collapse": {"ntxent_over_chance": 0.43}, "final_head_effective_rank": 9.94,
      "val_bag_auc": 0.9824, "val_recall_at_k_mean": 0.5833, "n_val_bags": 40, "mil_best_epoch": 25,
      "bag_auc": 0.1, "retrieval_recall_at_k_mean": 0.1}))
  return str(path)


def test_probe_separates_separable_cells_and_not_noise(tmp_path):
  assert demo_select.probe_auc(_workdir(tmp_path / "a", True)) == 1.0
  assert demo_select.probe_auc(_workdir(tmp_path / "b", False)) < 0.9


def test_row_has_the_validation_numbers_and_no_test_metric(tmp_path):
  row = demo_select.row(_workdir(tmp_path, True))
  assert row == {"ntxent_over_chance": 0.43, "head_rank": 9.9, "probe_auc": 1.0, "val_auc": 0.982,
                 "val_recall@5": 0.583, "n_val": 40, "mil_best_epoch": 25}
