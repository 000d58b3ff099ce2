"""tools.studies.deepapl: settings grouped over their seeds."""

from __future__ import annotations

import pytest

from tools.studies import deepapl


@pytest.mark.parametrize("name, key", [
    ("r72_random_mean_valloss", ("r72_random_mean_valloss", 0)),
    ("r72_random_s1_mean_valloss", ("r72_random_mean_valloss", 1)),
    ("r96_random_s2", ("r96_random", 2)),
    ("r72_random_s2+meanpool", ("r72_random+meanpool", 2)),
    ("r72_slam_ags_heads_e1", ("r72_slam_ags_heads_e1", 0)),  # "_heads" is not a seed
])
def test_seed_key(name, key):
  assert deepapl.seed_key(name) == key


def test_seed_summary_and_table():
  rows = [{"setting": n, "aggregator": "mean", "pooled_auc": a, "balanced_accuracy": b} for n, a, b in [
      ("r72_random_mean", 0.85, 0.8), ("r72_random_s1_mean", 0.89, 0.7), ("r72_random_s2_mean", 0.81, 0.75),
      ("r48_random_mean", 0.86, 0.8)]]
  summary = {r["setting"]: r for r in deepapl.seed_summary(rows)}
  assert summary["r72_random_mean"]["seeds"] == [0, 1, 2]
  assert summary["r72_random_mean"]["auc_mean"] == pytest.approx(0.85)
  assert (summary["r72_random_mean"]["auc_min"], summary["r72_random_mean"]["auc_max"]) == (0.81, 0.89)
  assert summary["r48_random_mean"]["seeds"] == [0]
  table = deepapl.seed_table(list(summary.values()))
  assert "| r72_random_mean | mean | 0,1,2 | 0.850 / 0.890 / 0.810 | 0.850 | 0.810 - 0.890 | 0.750 |" in table


def test_factor_tables_mark_missing_rows_and_show_seeds():
  rows = [{"setting": n, "aggregator": "mean", "pooled_auc": a, "ci_lo": a - 0.1, "ci_hi": a + 0.1,
           "balanced_accuracy": 0.8, "brier": 0.3, "promyelocyte_ap": 0.04, "promyelocyte_recall_at_k": 0.01}
          for n, a in [("r72_random_mean_valloss", 0.85), ("r72_random_s1_mean_valloss", 0.89),
                       ("r48_random_mean_valloss", 0.86)]]
  text = deepapl.factor_tables(rows, deepapl.seed_summary(rows))
  assert ("| 48 px (54 px cells) | `r48_random_mean_valloss` | 0.860 [0.760, 0.960] | 0.800 | 0.300 | "
          "0.040 / 0.010 | seed 0 only |") in text
  assert "0.850 / 0.890 (0.870) |" in text
  assert "| 96 px (108 px cells; the recipe) | `r96_random_mean_valloss` | not run |" in text
