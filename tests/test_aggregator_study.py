"""tools.studies.aggregators: names each run's aggregator from its settings and summarises over seeds."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tools.studies import aggregators


def _write(tmp_path, runs):
  (tmp_path / "settings").mkdir()
  fields = ["method", "witness_rate", "seed", "settings_hash", "val_bag_auc", "val_recall_at_k_mean",
            "val_retrieval_ap_mean", "ntxent_over_chance", "bag_auc"]
  with open(tmp_path / "runs.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for i, (agg, wr, seed, auc, test_auc) in enumerate(runs):
      h = f"h{i}"
      settings = {"pretrain.lr": 0.01} | ({} if agg is None else {"pretrain.aggregator": agg})
      (tmp_path / "settings" / f"{h}.json").write_text(json.dumps({"settings": settings}))
      w.writerow({"method": "slam_ags_heads", "witness_rate": wr, "seed": seed, "settings_hash": h,
                  "val_bag_auc": auc, "val_recall_at_k_mean": "", "val_retrieval_ap_mean": 0.5,
                  "ntxent_over_chance": 0.2, "bag_auc": test_auc})
  return str(tmp_path / "runs.csv")


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
  path = _write(tmp_path, [("sum", 0.01, 0, 0.6, 0.11), ("sum", 0.01, 1, 0.8, 0.12),
                           (None, 0.01, 0, 0.7, 0.13), ("mgda", 0.1, 0, 1.0, 0.14)])
  rows = aggregators.load(path)
  assert sorted(r["aggregator"] for r in rows) == ["method", "mgda", "sum", "sum"]
  table = aggregators.summary_table(rows)
  lines = table.splitlines()
  assert lines[2].startswith("| `mgda` | 10 % | 0 | 1.000 |")  # 10 % first
  sum_line = next(line for line in lines if line.startswith("| `sum`"))
  assert "| 0,1 | 0.700 ± 0.141 |" in sum_line  # sample std of 0.6, 0.8
  assert "0.11" not in table and "0.12" not in table  # no test column is read
  assert aggregators.mean_std([1.0])[0] == 1.0 and math.isnan(aggregators.mean_std([1.0])[1])
  assert "| `method` | 1 % | 0 |" in aggregators.run_table(rows)


def test_missing_settings_is_one_error_line(tmp_path, capsys):
  path = _write(tmp_path, [("sum", 0.01, 0, 0.6, 0.1)])
  (tmp_path / "settings" / "h0.json").unlink()
  assert aggregators.main(["--csv", path]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--csv", "/nonexistent/runs.csv"]])
def test_missing_csv(argv, capsys):
  assert aggregators.main(argv) == 2
  assert capsys.readouterr().err.startswith("error:")
