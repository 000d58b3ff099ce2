r"""Issue 28's aggregator study table: validation metrics of the PBC-ERB sweep, per aggregator.

  python -m tools.studies.aggregators --csv results/aggregators/runs.csv

Reads the sweep's ``runs.csv`` (``tools.pbc_erb.sweep --csv``) and its ``settings/<hash>.json``
(beside the CSV) to name each run's ``pretrain.aggregator`` (``method`` where unset), and
prints two markdown tables: one row per run, then mean +- sample std over seeds per
aggregator and witness rate. Validation columns only (the test columns stay unread; the
study chooses nothing on them).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

RUN_COLUMNS = (  # (csv column, header, decimals)
    ("val_bag_auc", "val bag AUC", 3), ("val_recall_at_k_mean", "val recall@20", 3),
    ("val_retrieval_ap_mean", "val retrieval AP", 3), ("conflict_fraction", "conflict fraction", 2),
    ("mean_task_cosine", "mean task cosine", 3), ("final_head_effective_rank", "head rank", 1),
    ("ntxent_over_chance", "NT-Xent / chance", 2), ("pretrain_wall_s", "pretrain s", 0))
SUMMARY_COLUMNS = RUN_COLUMNS[:3] + (RUN_COLUMNS[6],)


def aggregator_of(row: dict, settings_dir: str) -> str:
  """The run's ``pretrain.aggregator`` from its settings file (``method`` when unset)."""
  path = os.path.join(settings_dir, row["settings_hash"] + ".json")
  with open(path) as f:
    settings = json.load(f)["settings"]
  return settings.get("pretrain.aggregator", "method")


def _num(value: str) -> float:
  return float(value) if value not in (None, "") else math.nan


def _fmt(x: float, d: int) -> str:
  return "" if math.isnan(x) else f"{x:.{d}f}"


def run_table(rows: list[dict]) -> str:
  out = ["| aggregator | WR | seed | " + " | ".join(h for _, h, _ in RUN_COLUMNS) + " |",
         "|---" * (3 + len(RUN_COLUMNS)) + "|"]
  for r in sorted(rows, key=lambda r: (-_num(r["witness_rate"]), r["aggregator"], int(r["seed"]))):
    cells = [_fmt(_num(r.get(c)), d) for c, _, d in RUN_COLUMNS]
    out.append(f"| `{r['aggregator']}` | {_num(r['witness_rate']) * 100:g} % | {r['seed']} | "
               + " | ".join(cells) + " |")
  return "\n".join(out)


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (nan for one value) of the non-nan values."""
  v = [x for x in values if not math.isnan(x)]
  if not v:
    return math.nan, math.nan
  mean = sum(v) / len(v)
  std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
  return mean, std


def summary_table(rows: list[dict]) -> str:
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in rows:
    groups[(_num(r["witness_rate"]), r["aggregator"])].append(r)
  out = ["| aggregator | WR | seeds | " + " | ".join(h + " (mean ± std)" for _, h, _ in SUMMARY_COLUMNS) + " |",
         "|---" * (3 + len(SUMMARY_COLUMNS)) + "|"]
  for (wr, agg), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
    seeds = ",".join(sorted({g["seed"] for g in group}, key=int))
    cells = []
    for c, _, d in SUMMARY_COLUMNS:
      m, s = mean_std([_num(g.get(c)) for g in group])
      cells.append(_fmt(m, d) + ("" if math.isnan(s) else f" ± {s:.{d}f}"))
    out.append(f"| `{agg}` | {wr * 100:g} % | {seeds} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def load(csv_path: str, settings_dir: str | None = None) -> list[dict]:
  settings_dir = settings_dir or os.path.join(os.path.dirname(os.path.abspath(csv_path)), "settings")
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    r["aggregator"] = aggregator_of(r, settings_dir)
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  p.add_argument("--csv", default="results/aggregators/runs.csv")
  p.add_argument("--settings", default=None, help="settings/ folder (default: beside the CSV)")
  a = p.parse_args(argv)
  try:
    rows = load(a.csv, a.settings)
  except (OSError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("### Per aggregator (mean ± std over seeds)\n\n" + summary_table(rows)
        + "\n\n### Per run\n\n" + run_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
