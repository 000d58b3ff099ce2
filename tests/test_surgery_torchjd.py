"""The surgery aggregators against TorchJD 0.18 (optional extra ``torchjd``; skipped without it).

Closed forms (and MGDA, whose Frank-Wolfe iteration is reproduced step for step) to
1e-6 relative in float64 and 1e-4 in float32; solver-based ones to the solvers'
tolerance (stated per test); stateful ones over a sequence of steps; random ones in
distribution (empirical means of both against the exact expectation).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the optional extra: pip install '.[torchjd]'")
A = pytest.importorskip("torchjd.aggregation",
                        reason="needs TorchJD 0.18: pip install '.[torchjd]'")

from slamags_jax import surgery  # noqa: E402
from slamags_jax.surgery.projection import gradvac_weights  # noqa: E402

N = 30  # parameters, split over three leaves
TASKS = [2, 3, 4, 5, 6]


def jacobian(m, kind, seed=0):
  rng = np.random.default_rng(seed + 100 * m)
  j = rng.standard_normal((m, N))
  if kind == "conflict":  # every other task nearly opposite task 0, unequal norms
    j[1:] = -j[:1] * rng.uniform(0.5, 3.0, (m - 1, 1)) + 0.1 * rng.standard_normal((m - 1, N))
  return j


def to_tree(j, dtype):
  m = j.shape[0]
  j = np.asarray(j, dtype)
  return {"a": jnp.asarray(j[:, :5]), "b": {"k": jnp.asarray(j[:, 5:25].reshape(m, 4, 5))},
          "c": jnp.asarray(j[:, 25:])}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])


def run_steps(tx, js, dtype=np.float64):
  """Flat outputs of ``tx`` over the Jacobians ``js`` (one jitted update per step)."""
  tree = to_tree(js[0], dtype)
  state = tx.init(jax.tree_util.tree_map(lambda x: x[0], tree))
  update = jax.jit(tx.update)
  outs = []
  for j in js:
    out, state = update(to_tree(j, dtype), state)
    outs.append(flat(out))
  return outs


def torch_steps(agg, js, dtype=torch.float64):
  return [agg(torch.tensor(j, dtype=dtype)).double().numpy() for j in js]


def rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def closed_form(m, dtype=torch.float64):
  """(name, jax transform, torchjd aggregator) for the closed-form methods at m tasks."""
  pref = [0.5 + 0.25 * i for i in range(m)]
  tpref = torch.tensor(pref, dtype=dtype)
  cases = [
      ("upgrad", surgery.upgrad(m), A.UPGrad()),
      ("upgrad_pref", surgery.upgrad(m, pref), A.UPGrad(tpref)),
      ("dualproj", surgery.dualproj(m), A.DualProj()),
      ("dualproj_pref", surgery.dualproj(m, pref), A.DualProj(tpref)),
      ("mgda", surgery.mgda(m), A.MGDA()),
      ("imtl_g", surgery.imtl_g(m), A.IMTLG()),
      ("con_fig", surgery.con_fig(m), A.ConFIG()),
      ("mean", surgery.mean_tasks(m), A.Mean()),
      ("sum", surgery.sum_tasks(m), A.Sum()),
      ("constant", surgery.constant_weights(pref), A.Constant(tpref)),
  ]
  for mode in ("min", "median", "rmse"):
    cases.append((f"aligned_mtl_{mode}", surgery.aligned_mtl(m, scale_mode=mode),
                  A.AlignedMTL(scale_mode=mode)))
  if m >= 3:
    cases.append(("trimmed_mean", surgery.trimmed_mean(m, 1), A.TrimmedMean(1)))
  if m >= 4:  # n_byzantine = m - 4: each score sums two distances (one distance always ties)
    cases.append(("krum", surgery.krum(m, m - 4), A.Krum(m - 4)))
    cases.append(("krum_2", surgery.krum(m, m - 4, n_selected=2), A.Krum(m - 4, n_selected=2)))
  if m == 2:
    cases.append(("pcgrad", surgery.pcgrad(2), A.PCGrad()))
  return cases


@pytest.mark.parametrize("m", TASKS)
def test_closed_form_equal_to_torchjd_float64(m):
  errors = {}
  with jax.enable_x64(True):
    for kind in ("random", "conflict"):
      j = jacobian(m, kind)
      for name, tx, agg in closed_form(m):
        errors[(name, kind)] = rel(run_steps(tx, [j])[0], torch_steps(agg, [j])[0])
  bad = {k: v for k, v in errors.items() if not v < 1e-6}
  assert not bad, bad


@pytest.mark.parametrize("m", [3, 6])
def test_closed_form_equal_to_torchjd_float32(m):
  """1e-4 on random Jacobians. On strongly conflicting ones G is ill-conditioned (cond up
  to ~1e4), so float32 weights are only defined to about cond * 1e-7: there both float32
  results must lie within 10 * cond(G) * eps32 of the float64 TorchJD result."""
  errors = {}
  for kind in ("random", "conflict"):
    j64 = jacobian(m, kind)
    j = j64.astype(np.float32)
    g = j.astype(np.float64) @ j.astype(np.float64).T
    cond = np.linalg.cond(g)
    tol = 1e-4 if kind == "random" else max(1e-4, 10 * cond * np.finfo(np.float32).eps)
    for (name, tx, agg), (_, _, agg64) in zip(closed_form(m, torch.float32), closed_form(m)):
      ours = run_steps(tx, [j], np.float32)[0]
      if kind == "random":
        errors[(name, kind)] = (rel(ours, torch_steps(agg, [j], torch.float32)[0]), tol)
      else:
        ref64 = torch_steps(agg64, [j.astype(np.float64)])[0]
        theirs = torch_steps(agg, [j], torch.float32)[0]
        errors[(name, kind)] = (max(rel(ours, ref64), rel(theirs, ref64)), tol)
  bad = {k: v for k, v in errors.items() if not v[0] < v[1]}
  assert not bad, bad


def test_krum_picks_a_minimum_score_when_scores_tie():
  # n_byzantine = m - 3: each score is one nearest distance, so the closest pair ties.
  with jax.enable_x64(True):
    for m in (3, 4, 5):
      j = jacobian(m, "random", seed=3)
      out = run_steps(surgery.krum(m, m - 3), [j])[0]
      sq = np.sum(j * j, 1)
      dist = np.sqrt(np.maximum(sq[None] + sq[:, None] - 2 * j @ j.T, 0))
      scores = np.sort(dist, 1)[:, 1]
      best = np.flatnonzero(np.isclose(scores, scores.min()))
      assert any(rel(out, j[i]) < 1e-12 for i in best)


def bargaining_spread(j, solved, d):
  """Relative spread of ``w_i (G w)_i`` over tasks, ``d = J^T w``, G from the Jacobian
  the weights were solved on (0 at the Nash bargaining solution, clipped or not)."""
  w = np.linalg.lstsq(j.T, d, rcond=None)[0]
  prod = w * (solved @ solved.T @ w)
  return float(np.std(prod) / abs(np.mean(prod)))


@pytest.mark.parametrize("m", TASKS)
def test_solver_based_equal_to_torchjd_within_solver_tolerance(m):
  """CAGrad (cvxpy/Clarabel): 1e-3 (measured up to 2.4e-4 at c = 2 on conflicting
  Jacobians; our optimality is checked in test_surgery_properties); FairGrad (scipy
  least_squares, ftol 1e-8): 1e-6; Nash-MTL (20 warm-started CCP iterations, stopping at
  ||G a - 1/a|| < 1e-3): 1e-4 over 3 steps, except where TorchJD's iterations stop short
  of the bargaining solution (measured on later conflicting steps: 10-50 % apart); there
  ours must satisfy ``w_i (G w)_i = const`` to 1e-8 and TorchJD's must not."""
  pytest.importorskip("cvxpy", reason="TorchJD's CAGrad and NashMTL need cvxpy")
  errors = {}
  with jax.enable_x64(True):
    for kind in ("random", "conflict"):
      j = jacobian(m, kind)
      js = [j * (1 + 0.5 * s) + 0.3 * s * jacobian(m, "random", seed=s + 7) for s in range(3)]
      for c in (0.0, 0.5, 2.0):
        errors[(f"cagrad{c}", kind)] = (
            rel(run_steps(surgery.cagrad(m, c), [j])[0], torch_steps(A.CAGrad(c), [j])[0]), 1e-3)
      for alpha in (0.5, 1.0, 2.0):
        errors[(f"fairgrad{alpha}", kind)] = (
            rel(run_steps(surgery.fairgrad(m, alpha), [j])[0],
                torch_steps(A.FairGrad(alpha), [j])[0]), 1e-6)
      for max_norm, every in ((1.0, 1), (0.0, 2)):
        ours = run_steps(surgery.nash_mtl(m, max_norm=max_norm, update_weights_every=every), js)
        ref = torch_steps(A.NashMTL(m, max_norm=max_norm, update_weights_every=every), js)
        for step, (a, b, jj) in enumerate(zip(ours, ref, js)):
          solved = js[step - step % every]  # the Jacobian the weights were solved on
          if rel(a, b) < 1e-4:
            continue
          errors[(f"nash_mtl{max_norm},{every} step {step}", kind)] = (
              bargaining_spread(jj, solved, a), min(1e-8, 1e-3 * bargaining_spread(jj, solved, b)))
  bad = {k: v for k, v in errors.items() if not v[0] < v[1]}
  assert not bad, bad


def step_sequence(m, steps=4):
  return [jacobian(m, "conflict" if s % 2 else "random", seed=s) * (1 + s) for s in range(steps)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stateful_equal_to_torchjd_over_steps(dtype):
  """GradVac (2 tasks: no random order) and ExcessMTL (with and without warm-up), 5 steps."""
  tol, tdt = (1e-6, torch.float64) if dtype == "float64" else (1e-4, torch.float32)
  errors = {}
  with jax.enable_x64(dtype == "float64"):
    for beta in (0.5, 0.01):
      js = step_sequence(2, 5)
      ours = run_steps(surgery.gradvac(2, beta=beta), js, dtype)
      ref = torch_steps(A.GradVac(beta=beta), [x.astype(dtype) for x in js], tdt)
      errors[f"gradvac{beta}"] = max(map(rel, ours, ref))
    for m in (2, 3, 5):
      for warmup in (0, 2):
        js = step_sequence(m, 5)
        ours = run_steps(surgery.excess_mtl(m, robust_step_size=0.5, n_warmup_steps=warmup), js, dtype)
        ref = torch_steps(A.ExcessMTL(robust_step_size=0.5, n_warmup_steps=warmup),
                          [x.astype(dtype) for x in js], tdt)
        errors[f"excess_mtl{m},{warmup}"] = max(map(rel, ours, ref))
  bad = {k: v for k, v in errors.items() if not v < tol}
  assert not bad, bad


# ----------------------------------------------------------------------------- random ones

def empirical_mean(samples):
  s = np.stack(samples)
  return s.mean(0), s.std(0) / np.sqrt(len(s))


def assert_mean_matches(samples, expected, what):
  mean, se = empirical_mean(samples)
  z = np.abs(mean - expected) / np.maximum(se, 1e-12 * np.abs(expected).max())
  assert np.all((z < 5) | (np.abs(mean - expected) < 1e-9)), (what, float(z.max()))


def test_graddrop_in_distribution():
  """Both empirical means (1500 draws) within 5 standard errors of the exact expectation."""
  m, draws = 3, 1500
  j = jacobian(m, "conflict", seed=4)
  leak = [0.2, 0.0, 0.5]
  p = 0.5 * (1 + j.sum(0) / np.abs(j).sum(0))
  keep = np.where(j > 0, p, np.where(j < 0, 1 - p, 0.0))
  lv = np.asarray(leak)[:, None]
  expected = np.sum((lv + (1 - lv) * keep) * j, 0)
  with jax.enable_x64(True):
    tx = surgery.graddrop(m, leak=leak, seed=1)
    ours = run_steps(tx, [j] * draws)
  torch.manual_seed(0)
  agg = A.GradDrop(leak=torch.tensor(leak, dtype=torch.float64))
  ref = torch_steps(agg, [j] * draws)
  assert_mean_matches(ours, expected, "jax")
  assert_mean_matches(ref, expected, "torchjd")
  assert len({tuple(np.round(x, 9)) for x in ours[:50]}) > 1  # it is random


def order_expectation(weights_of_order, j):
  """Exact mean output over every per-task order of the other tasks (uniform)."""
  m = j.shape[0]
  rows = [list(itertools.permutations([k for k in range(m) if k != i])) for i in range(m)]
  outs = [weights_of_order(np.asarray(combo, np.int32)) @ j for combo in itertools.product(*rows)]
  return np.mean(outs, 0)


@pytest.mark.parametrize("m", [3, 4])
def test_pcgrad_random_order_in_distribution(m):
  draws = 600
  j = jacobian(m, "conflict", seed=5)
  with jax.enable_x64(True):
    gram = jnp.asarray(j @ j.T)
    weights = jax.jit(lambda order: surgery.projection_weights(gram, order, 0.0)[0])
    expected = order_expectation(lambda order: np.asarray(weights(jnp.asarray(order))), j)
    ours = run_steps(surgery.pcgrad(m, seed=2), [j] * draws)
  torch.manual_seed(0)
  ref = torch_steps(A.PCGrad(), [j] * draws)
  assert_mean_matches(ours, expected, "jax")
  assert_mean_matches(ref, expected, "torchjd")


def test_gradvac_random_order_first_step_in_distribution():
  m, draws = 3, 600
  j = jacobian(m, "conflict", seed=6)
  with jax.enable_x64(True):
    gram = jnp.asarray(j @ j.T)
    zero = jnp.zeros((m, m))
    weights = jax.jit(lambda order: gradvac_weights(gram, zero, order, 0.5, 1e-8)[0])
    expected = order_expectation(lambda order: np.asarray(weights(jnp.asarray(order))), j)
    tx = surgery.gradvac(m, seed=3)
    tree = to_tree(j, np.float64)
    state = tx.init(jax.tree_util.tree_map(lambda x: x[0], tree))
    update = jax.jit(tx.update)
    ours = []
    for s in range(draws):  # a fresh moving average every draw: first steps only
      state = state._replace(extra=zero)
      out, state = update(tree, state)
      ours.append(flat(out))
  torch.manual_seed(0)
  ref = []
  for _ in range(draws):
    ref.append(torch_steps(A.GradVac(), [j])[0])
  assert_mean_matches(ours, expected, "jax")
  assert_mean_matches(ref, expected, "torchjd")


def test_random_weights_in_distribution():
  """softmax(N(0, I)) weights: per-task means 1/m and the same spread as TorchJD's draws."""
  m, draws = 4, 2000
  eye = np.eye(m, N)  # orthonormal rows: the output is the weight vector itself
  with jax.enable_x64(True):
    ours = np.stack(run_steps(surgery.random_weights(m, seed=4), [eye] * draws))[:, :m]
  torch.manual_seed(0)
  ref = np.stack([A.Random()(torch.tensor(eye)).numpy() for _ in range(draws)])[:, :m]
  for s in (ours, ref):
    np.testing.assert_allclose(s.sum(1), 1.0, rtol=1e-12)
    assert np.all(np.abs(s.mean(0) - 1 / m) < 5 * s.std(0) / np.sqrt(draws))
  # same distribution of the largest weight: means within 5 joint standard errors
  a, b = ours.max(1), ref.max(1)
  assert abs(a.mean() - b.mean()) < 5 * np.sqrt(a.var() / draws + b.var() / draws)
