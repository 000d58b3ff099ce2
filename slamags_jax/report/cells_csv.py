"""The per-cell tables (``cells.csv``) of the bag report, the slide report and ``predict``.

Their columns are a contract users script against: ``CSV_COLUMNS`` for simulated bags;
``slide_id[, label, called], path[, annotation], attention..., rank`` for slides.
Ranks (1 = highest attention) break ties by the bag's cell order.
"""

from __future__ import annotations

import csv
from typing import Any, Sequence

import numpy as np

from slamags_jax import metrics
from slamags_jax.runtime import fileio

CSV_COLUMNS = ("bag", "bag_label", "bag_pred", "bag_prob", "cell_id", "path", "cell_class",
               "instance_label", "attention", "attention_x_n", "rank")


def ranks(scores: np.ndarray) -> np.ndarray:
  """1 = highest score; ties keep the bag's cell order."""
  r = np.empty(len(scores), np.int64)
  r[metrics.stable_rank_order(scores)] = np.arange(1, len(scores) + 1)
  return r


def write_bag_cells_csv(path: str, test_bags: Sequence[dict[str, Any]]) -> int:
  """One row per (joined test bag, cell) with ``CSV_COLUMNS``; returns the number of rows."""
  rows = 0
  with fileio.atomic_open(path, "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for b in test_bags:
      n = len(b["attention"])
      rank = ranks(b["attention"])
      for i in range(n):
        a = float(b["attention"][i])
        w.writerow([b["id"], b["label"], b["pred"], f"{b['prob']:.6f}", int(b["cell_ids"][i]),
                    b["paths"][i], b["classes"][i], int(b["instance_labels"][i]), f"{a:.6g}",
                    f"{a * n:.6g}", int(rank[i])])
        rows += 1
  return rows


def attention_columns(labels: Sequence[str], branches: int) -> list[str]:
  """``attention_<label>`` per class when the model has a branch per class, else ``attention``."""
  if branches == len(labels):
    return [f"attention_{name}" for name in labels]
  return ["attention"]


def write_slide_cells_csv(path: str, slides: Sequence[dict[str, Any]], labels: Sequence[str],
                          with_truth: bool) -> int:
  """One row per (slide, cell): ``slide_id[, label, called], path[, annotation]``, attention, rank."""
  branches = slides[0]["attention_branches"].shape[1] if slides else 1
  header = ["slide_id"] + (["label", "called"] if with_truth else []) + ["path"] + \
      (["annotation"] if with_truth else []) + attention_columns(labels, branches) + ["rank"]
  rows = 0
  with fileio.atomic_open(path, "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    for s in slides:
      r = ranks(s["attention"])
      called = labels[int(s["pred"])]
      for i, p in enumerate(s["paths"]):
        row = [s["id"]] + ([labels[int(s["label"])], called] if with_truth else []) + [p]
        if with_truth:
          row.append(s["annotations"][i])
        row += [f"{float(x):.6g}" for x in s["attention_branches"][i]] + [int(r[i])]
        w.writerow(row)
        rows += 1
  return rows
