"""``bench --mode aggregate`` at a tiny size: one JSON line per transform, and its table."""

from __future__ import annotations

import json

from slamags_jax import bench
from slamags_jax.benchmarks import aggregate


def test_aggregate_mode_prints_one_line_per_transform_and_a_table(capsys):
  bench.main(["--mode", "aggregate", "--tasks", "2,3", "--params", "1000", "--steps", "1",
              "--transforms", "upgrad,mean_tasks,trimmed_mean"])
  rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
  # trimmed_mean needs 3 tasks (one trimmed on each side): absent at m = 2
  assert [(r["transform"], r["tasks"]) for r in rows] == [
      ("upgrad", 2), ("mean_tasks", 2), ("upgrad", 3), ("mean_tasks", 3), ("trimmed_mean", 3)]
  assert all(r["mode"] == "aggregate" and r["params"] == 1000 and r["jax_ms"] > 0 for r in rows)
  table = aggregate.markdown_table(rows)
  assert table.splitlines()[0] == "| transform | m=2, n=1e+03 | m=3, n=1e+03 |"
  assert "| trimmed_mean | - |" in table
