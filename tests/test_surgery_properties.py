"""Each aggregator's defining property, checked without torch (float64, small Jacobians)."""

from __future__ import annotations

import doctest
import importlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamags_jax import surgery

N = 12


def jacobian(m, kind="conflict", seed=0):
  rng = np.random.default_rng(seed + 10 * m)
  j = rng.standard_normal((m, N))
  if kind == "conflict":
    j[1:] = -j[:1] * rng.uniform(0.5, 3.0, (m - 1, 1)) + 0.3 * rng.standard_normal((m - 1, N))
  return j


def tree(j):
  return {"a": jnp.asarray(j[:, :4]), "b": jnp.asarray(j[:, 4:].reshape(-1, 2, 4))}


def flat(t):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(t)])


def apply(tx, j, steps=1):
  g = tree(j)
  state = tx.init(jax.tree_util.tree_map(lambda x: x[0], g))
  for _ in range(steps):
    out, state = tx.update(g, state)
  return flat(out), state


def all_transforms(m):
  """Every aggregator at m tasks, default settings (the ones that take m)."""
  txs = {
      "upgrad": surgery.upgrad(m), "dualproj": surgery.dualproj(m), "mgda": surgery.mgda(m),
      "imtl_g": surgery.imtl_g(m), "aligned_mtl": surgery.aligned_mtl(m),
      "con_fig": surgery.con_fig(m), "cagrad": surgery.cagrad(m, 0.5),
      "fairgrad": surgery.fairgrad(m, 1.0), "nash_mtl": surgery.nash_mtl(m),
      "gradvac": surgery.gradvac(m), "graddrop": surgery.graddrop(m),
      "excess_mtl": surgery.excess_mtl(m), "random_weights": surgery.random_weights(m),
      "constant_weights": surgery.constant_weights([1.0] * m), "pcgrad": surgery.pcgrad(m),
      "mean_tasks": surgery.mean_tasks(m), "sum_tasks": surgery.sum_tasks(m),
  }
  if m >= 3:
    txs["trimmed_mean"] = surgery.trimmed_mean(m, 1)
    txs["krum"] = surgery.krum(m, m - 3)
  return txs


@pytest.mark.parametrize("m", [2, 3, 5])
def test_non_conflicting_upgrad_dualproj_mgda(m):
  """UPGrad, DualProj, MGDA: <d, g_i> >= 0 for every task (to the solvers' precision)."""
  with jax.enable_x64(True):
    for seed in range(3):
      j = jacobian(m, seed=seed)
      scale = np.linalg.norm(j, axis=1).max() ** 2
      for name in ("upgrad", "dualproj", "mgda"):
        d, _ = apply(getattr(surgery, name)(m), j)
        # reg_eps (1e-4 of the trace) and MGDA's stopping rule leave a small slack
        assert np.all(j @ d >= -2e-3 * scale), (name, j @ d)
      d, _ = apply(surgery.upgrad(m, reg_eps=0.0), j)
      assert np.all(j @ d >= -1e-9 * scale)
      mean = j.mean(0)
      assert np.any(j @ mean < 0)  # the mean does conflict: the test can fail


def test_upgrad_linear_under_scaling_and_scale_equivariant():
  """UPGrad (TorchJD lists it linear under scaling): d(diag(c) J) is linear in c >= 0."""
  with jax.enable_x64(True):
    j = jacobian(3, seed=1)
    c1, c2 = np.array([1.0, 2.0, 0.5]), np.array([0.3, 0.1, 4.0])
    tx = surgery.upgrad(3, reg_eps=0.0)
    d1 = apply(tx, c1[:, None] * j)[0]
    d2 = apply(tx, c2[:, None] * j)[0]
    d12 = apply(tx, (c1 + c2)[:, None] * j)[0]
    np.testing.assert_allclose(d12, d1 + d2, rtol=1e-8, atol=1e-10)
    # the mean is not linear under scaling with a non-trivial direction change: a real check
    for name in ("upgrad", "dualproj", "mgda", "imtl_g", "aligned_mtl", "con_fig", "cagrad",
                 "pcgrad", "mean_tasks", "sum_tasks"):
      tx = all_transforms(3)[name]
      np.testing.assert_allclose(apply(tx, 7.0 * j)[0], 7.0 * apply(tx, j)[0], rtol=1e-8,
                                 err_msg=name)


def test_mgda_is_the_minimum_norm_point_of_the_hull():
  with jax.enable_x64(True):
    j = jacobian(4, seed=2)
    from slamags_jax.surgery._qp import simplex_qp
    w_star = np.asarray(simplex_qp(jnp.zeros(4), jnp.asarray(j @ j.T), jnp.asarray(1.0)))
    d_star = w_star @ j  # the exact minimum-norm point (active-set QP)
    assert np.all(j @ d_star >= (d_star @ d_star) * (1 - 1e-9))  # its KKT conditions
    scale = np.max(np.sum(j * j, 1))
    for eps, iters, tol in ((1e-3, 100, 1e-2), (1e-9, 20000, 1e-4)):  # Frank-Wolfe: O(1/k)
      d, _ = apply(surgery.mgda(4, epsilon=eps, max_iters=iters), j)
      assert d @ d - d_star @ d_star < tol * scale
      assert d @ d >= d_star @ d_star * (1 - 1e-9)


def test_imtl_g_equal_projections_and_con_fig_equal_cosines():
  with jax.enable_x64(True):
    j = jacobian(3, seed=3)
    unit = j / np.linalg.norm(j, axis=1, keepdims=True)
    d, _ = apply(surgery.imtl_g(3), j)
    proj = unit @ d
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-9)
    d, _ = apply(surgery.con_fig(3), j)
    cos = unit @ d / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos.mean(), rtol=1e-9)
    assert cos.min() > 0
    np.testing.assert_allclose(np.linalg.norm(d), np.sum(j @ d) / np.linalg.norm(d), rtol=1e-9)


def test_aligned_mtl_combined_system_is_well_conditioned():
  """With pref 1/m the update is J^T B 1/m with J^T B having equal singular values."""
  with jax.enable_x64(True):
    j = jacobian(3, seed=4)
    ws = []
    for k in range(3):  # weights of each unit preference vector give the columns of B
      pref = np.eye(3)[k]
      d, _ = apply(surgery.aligned_mtl(3, pref), j)
      ws.append(np.linalg.lstsq(j.T, d, rcond=None)[0])
    sv = np.linalg.svd(j.T @ np.stack(ws, 1), compute_uv=False)
    np.testing.assert_allclose(sv, sv.min(), rtol=1e-8)


def test_fairgrad_and_nash_mtl_solve_their_optimality_conditions():
  with jax.enable_x64(True):
    j = jacobian(4, seed=5)
    g = j @ j.T
    for alpha in (0.5, 1.0, 3.0):
      d, _ = apply(surgery.fairgrad(4, alpha), j)
      w = np.linalg.lstsq(j.T, d, rcond=None)[0]
      np.testing.assert_allclose(g @ w, w ** (-1 / alpha), rtol=1e-8)
    np.testing.assert_allclose(apply(surgery.fairgrad(4, 0.0), j)[0], j.mean(0), rtol=1e-12)
    d, _ = apply(surgery.nash_mtl(4, max_norm=0.0), j)
    w = np.linalg.lstsq(j.T, d, rcond=None)[0]
    np.testing.assert_allclose(w * (g @ w), 1.0, rtol=1e-8)
    d, _ = apply(surgery.nash_mtl(4, max_norm=0.1), j)
    np.testing.assert_allclose(np.linalg.norm(d), 0.1, rtol=1e-9)


def test_cagrad_zero_c_is_the_mean_and_optimality():
  with jax.enable_x64(True):
    j = jacobian(3, seed=6)
    np.testing.assert_allclose(apply(surgery.cagrad(3, 0.0), j)[0], j.mean(0), rtol=1e-12)
    # CAGrad's dual objective at our w is not above that at any vertex or random simplex point
    from slamags_jax.surgery import solvers
    g = j @ j.T / np.trace(j @ j.T)
    a = g.mean(1)
    s = 0.5 * np.sqrt(a.mean())
    w = np.asarray(solvers.cagrad_weights(jnp.asarray(j @ j.T), 0.5))
    w_dual = (w - 1 / 3) / np.sum(w - 1 / 3)  # weights = 1/m + (sqrt_phi / ||g_w||) w_dual

    def f(x):
      return a @ x + s * np.sqrt(x @ g @ x)
    rng = np.random.default_rng(0)
    for x in list(np.eye(3)) + list(rng.dirichlet(np.ones(3), 200)):
      assert f(w_dual) <= f(x) + 1e-9


def test_krum_and_trimmed_mean_ignore_an_outlier():
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    good = 1.0 + 0.05 * rng.standard_normal((4, N))
    j = np.concatenate([good, -100.0 * np.ones((1, N))])
    d, _ = apply(surgery.krum(5, 1), j)
    assert any(np.allclose(d, row) for row in good)
    d, _ = apply(surgery.trimmed_mean(5, 1), j)
    assert np.all(np.abs(d - 1.0) < 0.2)


def test_graddrop_with_agreeing_signs_or_full_leak_is_the_sum():
  with jax.enable_x64(True):
    j = np.abs(jacobian(3, "random", seed=8))
    np.testing.assert_allclose(apply(surgery.graddrop(3), j)[0], j.sum(0), rtol=1e-12)
    jc = jacobian(3, seed=8)
    np.testing.assert_allclose(apply(surgery.graddrop(3, leak=[1.0] * 3), jc)[0], jc.sum(0),
                               rtol=1e-12)
    d = apply(surgery.graddrop(3), jc)[0]
    assert not np.allclose(d, jc.sum(0))


def test_gradvac_with_beta_zero_is_pcgrad_and_keeps_its_average():
  with jax.enable_x64(True):
    j = jacobian(2, seed=9)
    d, _ = apply(surgery.gradvac(2, beta=0.0, eps=0.0), j)
    np.testing.assert_allclose(d, apply(surgery.pcgrad(2, eps=0.0), j)[0], rtol=1e-10)
    _, state = apply(surgery.gradvac(2, beta=0.5), j, steps=3)
    cos = (j[0] @ j[1]) / np.linalg.norm(j[0]) / np.linalg.norm(j[1])
    # phi_hat moves from 0 towards the (negative) observed cosine
    assert cos < state.extra[0, 1] < 0


def test_random_weights_and_excess_mtl_weights_on_the_simplex():
  with jax.enable_x64(True):
    eye = np.eye(3, N)
    d1, state = apply(surgery.random_weights(3, seed=1), eye)
    d2, _ = surgery.random_weights(3, seed=1).update(tree(eye), state)
    assert abs(d1[:3].sum() - 1) < 1e-12 and np.all(d1[:3] > 0)
    assert not np.allclose(d1, flat(d2))  # a new draw every step
    np.testing.assert_allclose(apply(surgery.random_weights(3, seed=1), eye)[0], d1)
    j = jacobian(3, seed=10)
    _, state = apply(surgery.excess_mtl(3), j, steps=3)
    w = np.asarray(state.extra.weights)
    assert abs(w.sum() - 1) < 1e-12 and int(state.extra.steps) == 3


@pytest.mark.parametrize("m", [2, 4])
def test_every_transform_jits_in_a_chain_and_zero_gradients_give_zero(m):
  params = {"a": jnp.zeros(4), "b": jnp.zeros((2, 4))}
  for name, tx in all_transforms(m).items():
    chain = optax.chain(tx, optax.sgd(0.1))
    state = chain.init(params)
    step = jax.jit(chain.update)
    for j in (jacobian(m, seed=1).astype(np.float32), np.zeros((m, N), np.float32)):
      out, state = step(tree(j), state, params)
      assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out)), name
      assert jax.tree_util.tree_map(jnp.shape, out) == jax.tree_util.tree_map(jnp.shape, params)
    assert np.all(flat(out) == 0.0), name
    diag = surgery.diagnostics(state)
    assert diag.cosine.shape == (m, m), name


def test_input_checks_say_what_to_do():
  with pytest.raises(ValueError, match="num_tasks=3"):
    surgery.upgrad(3).update(tree(jacobian(2)), surgery.upgrad(3).init(None))
  with pytest.raises(ValueError, match="n_byzantine"):
    surgery.krum(3, 1)
  with pytest.raises(ValueError, match="trim_number"):
    surgery.trimmed_mean(2, 1)
  with pytest.raises(ValueError, match="pref_vector"):
    surgery.upgrad(2, [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="scale_mode"):
    surgery.aligned_mtl(2, scale_mode="max")


def test_docstring_examples_run():
  tried = 0
  for mod in ("weighted", "solvers", "coordinate", "projection"):
    res = doctest.testmod(importlib.import_module(f"slamags_jax.surgery.{mod}"), report=True)
    assert res.failed == 0, mod
    tried += res.attempted
  assert tried > 60


def test_import_stays_light():
  code = ("import sys, slamags_jax.surgery as s; "
          "print(sorted(m for m in ('flax', 'grain', 'tensorflow', 'torch', 'torchjd', 'scipy', "
          "'cvxpy') if m in sys.modules))")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == "[]"


def test_sharded_update_equals_unsharded():
  """Gram-space and coordinate-wise aggregators under 2 CPU devices, leaves sharded."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from slamags_jax import surgery
      mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
      rng = np.random.default_rng(0)
      g = {"w": rng.standard_normal((3, 8, 6)).astype(np.float32),
           "v": rng.standard_normal((3, 4)).astype(np.float32)}
      g["w"][1] = -0.7 * g["w"][0] + 0.5 * g["w"][1]
      sh = {"w": NamedSharding(mesh, P(None, "x", None)), "v": NamedSharding(mesh, P(None, "x"))}
      gs = {k: jax.device_put(v, sh[k]) for k, v in g.items()}
      params = {"w": jnp.zeros((8, 6)), "v": jnp.zeros(4)}
      for tx in (surgery.upgrad(3), surgery.mgda(3), surgery.cagrad(3), surgery.nash_mtl(3),
                 surgery.gradvac(3), surgery.excess_mtl(3), surgery.trimmed_mean(3, 1),
                 surgery.graddrop(3), surgery.con_fig(3)):
        ref, _ = jax.jit(tx.update)(g, tx.init(params))
        out, _ = jax.jit(tx.update)(gs, tx.init(params))
        for k in g:
          np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=2e-4, atol=1e-5)
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.startswith("OK")


@pytest.mark.parametrize("make", [
    lambda d: surgery.sum_tasks(3, diagnostics=d), lambda d: surgery.mean_tasks(3, diagnostics=d),
    lambda d: surgery.constant_weights([0.5, 2.0, 1.0], diagnostics=d),
    lambda d: surgery.random_weights(3, seed=4, diagnostics=d)])
def test_diagnostics_off_skips_only_the_diagnostics(make):
  """Weighting methods without the Gram pass: the same update over steps, zero diagnostics."""
  j = jacobian(3)
  on, off = make(True), make(False)
  params = jax.tree_util.tree_map(lambda x: x[0], tree(j))
  s_on, s_off = on.init(params), off.init(params)
  for step in range(3):
    g = tree(j * (step + 1))
    u_on, s_on = jax.jit(on.update)(g, s_on)
    u_off, s_off = jax.jit(off.update)(g, s_off)
    np.testing.assert_allclose(flat(u_off), flat(u_on), rtol=1e-12, atol=0)
  assert float(jnp.max(jnp.abs(surgery.diagnostics(s_on).norm_tasks))) > 0
  for leaf in jax.tree_util.tree_leaves(surgery.diagnostics(s_off)):
    assert not np.any(np.asarray(leaf))


def test_diagnostics_cannot_be_turned_off_where_the_gram_is_the_method():
  from slamags_jax.surgery._aggregator import aggregator
  with pytest.raises(ValueError, match="needs the Gram matrix"):
    aggregator("x", 2, lambda u, g, e, k: (None, jnp.ones(2), e), needs_gram=True, diagnostics=False)
