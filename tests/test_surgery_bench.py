"""``bench --mode aggregate`` at a tiny size: one JSON line per transform, and its table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from slamags_jax import bench, surgery
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


def test_in_step_stacking_times_the_per_task_inputs(capsys):
  bench.main(["--mode", "aggregate", "--tasks", "3", "--params", "1000", "--steps", "1",
              "--transforms", "upgrad,krum", "--stacking", "in_step"])
  rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
  assert [r["transform"] for r in rows] == ["upgrad"]  # krum needs m >= 4
  assert rows[0]["stacking"] == "in_step" and rows[0]["jax_ms"] > 0


def test_in_step_update_equals_the_materialized_one():
  j = aggregate._jacobian(3, 1000, 0)
  tree = aggregate._tree(j)
  tx = surgery.upgrad(3)
  state = tx.init(jax.tree_util.tree_map(lambda x: x[0], tree))
  parts = [jax.tree_util.tree_map(lambda x, t=t: x[t], tree) for t in range(3)]
  a, _ = jax.jit(tx.update)(tree, state)
  b, _ = jax.jit(lambda p, s: tx.update(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *p), s))(parts, state)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
