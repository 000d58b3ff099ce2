"""``bench --mode aggregate``: each surgery aggregator against its TorchJD 0.18 counterpart.

  python -m slamags_jax.bench --mode aggregate --tasks 2,4,8 --params 100000,1000000,10000000

For every transform, task count m and parameter count n: one float32 Jacobian (m x n,
task 1 half opposite task 0 so that the methods have conflicts to resolve); JAX gets it
as a stacked pytree of four leaves (n/2, n/4, n/8 and the rest, so the Gram-space
methods never see one flattened matrix), TorchJD as the m x n matrix it takes. JAX:
``jax.jit(tx.update)``, one warm-up call, then ``--steps`` timed calls with
``block_until_ready``; TorchJD: one warm-up call, then the same count. One JSON line
per (transform, m, n) with the median milliseconds of each (``jax_ms``,
``torchjd_ms``) and ``speedup = torchjd_ms / jax_ms``; ``torchjd_ms`` is null without
TorchJD (or for a configuration TorchJD rejects). The input arrays are built once per
(m, n) and not counted.

``--stacking`` says where JAX's task axis comes from: ``materialized`` (default) hands the
jitted update one stacked pytree, as ``jax.jacrev`` of stacked losses produces;
``in_step`` hands it the m per-task gradient pytrees and stacks them inside the same jit,
as a train step does after one backward pass per task (the pipeline's case). XLA:CPU
reads a task slice of a materialised ``[T, ...]`` leaf far more slowly than a separate
buffer (docs/performance.md), so the two differ at large n.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slamags_jax import surgery


def _cases(m: int) -> list[tuple[str, Callable[[], Any], Callable[[Any], Any] | None]]:
  """(name, JAX transform factory, TorchJD aggregator factory taking the torchjd module)."""
  pref = [1.0 + 0.5 * i for i in range(m)]
  cases = [
      ("upgrad", lambda: surgery.upgrad(m), lambda A: A.UPGrad()),
      ("mgda", lambda: surgery.mgda(m), lambda A: A.MGDA()),
      ("cagrad", lambda: surgery.cagrad(m, 0.5), lambda A: A.CAGrad(0.5)),
      ("pcgrad", lambda: surgery.pcgrad(m), lambda A: A.PCGrad()),
      ("imtl_g", lambda: surgery.imtl_g(m), lambda A: A.IMTLG()),
      ("aligned_mtl", lambda: surgery.aligned_mtl(m), lambda A: A.AlignedMTL()),
      ("dualproj", lambda: surgery.dualproj(m), lambda A: A.DualProj()),
      ("con_fig", lambda: surgery.con_fig(m), lambda A: A.ConFIG()),
      ("nash_mtl", lambda: surgery.nash_mtl(m), lambda A: A.NashMTL(m)),
      ("gradvac", lambda: surgery.gradvac(m), lambda A: A.GradVac()),
      ("graddrop", lambda: surgery.graddrop(m), lambda A: A.GradDrop()),
      ("fairgrad", lambda: surgery.fairgrad(m, 1.0), lambda A: A.FairGrad(1.0)),
      ("excess_mtl", lambda: surgery.excess_mtl(m), lambda A: A.ExcessMTL()),
      # The four weightings that need no Gram matrix run without their diagnostics (like TorchJD's).
      ("mean_tasks", lambda: surgery.mean_tasks(m, diagnostics=False), lambda A: A.Mean()),
      ("sum_tasks", lambda: surgery.sum_tasks(m, diagnostics=False), lambda A: A.Sum()),
      ("constant_weights", lambda: surgery.constant_weights(pref, diagnostics=False),
       lambda A: A.Constant(__import__("torch").tensor(pref))),
      ("random_weights", lambda: surgery.random_weights(m, diagnostics=False), lambda A: A.Random()),
  ]
  if m >= 4:
    cases.append(("krum", lambda: surgery.krum(m, 1), lambda A: A.Krum(1)))
  if m >= 3:
    cases.append(("trimmed_mean", lambda: surgery.trimmed_mean(m, 1), lambda A: A.TrimmedMean(1)))
  return cases


def _jacobian(m: int, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  j = rng.standard_normal((m, n), dtype=np.float32)
  j[1] = -0.5 * j[0] + j[1]
  return j


def _tree(j: np.ndarray) -> dict:
  m, n = j.shape
  cuts = [n // 2, n // 2 + n // 4, n // 2 + n // 4 + n // 8]
  parts = np.split(j, cuts, axis=1)
  return {f"leaf{i}": jax.device_put(p) for i, p in enumerate(parts)}


def _median_ms(fn: Callable[[], Any], steps: int) -> float:
  fn()  # warm-up (compiles on the JAX side)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def _time_jax(make: Callable[[], Any], tree: dict, steps: int, stacking: str = "materialized") -> float:
  tx = make()
  state = tx.init(jax.tree_util.tree_map(lambda x: x[0], tree))
  if stacking == "in_step":  # m separate per-task pytrees, stacked inside the jit
    m = jax.tree_util.tree_leaves(tree)[0].shape[0]
    inputs = [jax.tree_util.tree_map(lambda x, t=t: jax.device_put(np.asarray(x[t])), tree) for t in range(m)]
    update = jax.jit(lambda parts, st: tx.update(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), st))
  else:
    inputs, update = tree, jax.jit(tx.update)
  box = [state]

  def one():
    out, box[0] = update(inputs, box[0])
    jax.block_until_ready(out)
  return _median_ms(one, steps)


def _time_torch(make_agg, A, matrix, steps: int) -> float | None:
  if A is None or make_agg is None:
    return None
  try:
    agg = make_agg(A)
    return _median_ms(lambda: agg(matrix), steps)
  except Exception as e:
    print(f"torchjd failed: {e!r}", file=sys.stderr)
    return None


def run(a) -> None:
  """Prints one JSON line per (transform, tasks, params); ``a``: the bench's parsed args."""
  try:
    import torch
    import torchjd.aggregation as A
    torch_version = torch.__version__
  except ImportError:
    torch, A, torch_version = None, None, None
  tasks = [int(x) for x in str(a.tasks).split(",")]
  params = [int(float(x)) for x in str(a.params).split(",")]
  only = set(a.transforms.split(",")) if a.transforms else None
  host = {"devices": jax.device_count(), "platform": platform.machine(),
          "jax": jax.__version__, "torch": torch_version}
  for m in tasks:
    for n in params:
      j = _jacobian(m, n, a.seed)
      tree = _tree(j)
      matrix = torch.from_numpy(j) if torch is not None else None
      steps = a.steps if n <= 1_000_000 else max(2, a.steps // 3)
      for name, make, make_agg in _cases(m):
        if only and name not in only:
          continue
        jax_ms = _time_jax(make, tree, steps, getattr(a, "stacking", "materialized"))
        torch_ms = _time_torch(make_agg, A, matrix, steps)
        row = {"mode": "aggregate", "transform": name, "tasks": m, "params": n,
               "jax_ms": round(jax_ms, 3),
               "torchjd_ms": None if torch_ms is None else round(torch_ms, 3),
               "speedup": None if torch_ms is None else round(torch_ms / jax_ms, 2),
               "steps": steps, "stacking": getattr(a, "stacking", "materialized"), **host}
        print(json.dumps(row))
        sys.stdout.flush()
      del tree, matrix, j


def markdown_table(rows: list[dict]) -> str:
  """The JSON lines of ``run`` as a Markdown table: one row per transform, one column per (m, n)."""
  configs = sorted({(r["tasks"], r["params"]) for r in rows})
  names = list(dict.fromkeys(r["transform"] for r in rows))
  by = {(r["transform"], r["tasks"], r["params"]): r for r in rows}
  head = "| transform | " + " | ".join(f"m={m}, n={n:.0e}" for m, n in configs) + " |"
  lines = [head, "|---|" + "---|" * len(configs)]
  for name in names:
    cells = []
    for m, n in configs:
      r = by.get((name, m, n))
      if r is None:
        cells.append("-")
      elif r["torchjd_ms"] is None:
        cells.append(f"{r['jax_ms']:.3g} / -")
      else:
        cells.append(f"{r['jax_ms']:.3g} / {r['torchjd_ms']:.3g} ({r['speedup']:.2g}x)")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m slamags_jax.benchmarks.aggregate results.jsonl
  with open(sys.argv[1], encoding="utf-8") as f:
    sys.stdout.write(markdown_table([json.loads(x) for x in f if x.startswith("{")]))
