"""Tests of slamags_jax.surgery against a literal NumPy float64 reference of the rule."""

from __future__ import annotations

import doctest
import itertools
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

EPS = 1e-10
SHAPES = {"conv": (3, 3, 2, 4), "bias": (4,), "scale": (), "dense": {"kernel": (5, 3)}}


# ----------------------------------------------------------------------------- reference

def ref_surgery(grads, orders=None, rescale=True, eps=EPS, task_order=None):
  """The reference page's loop, literally: copies, loops over i and j, per-pair projections."""
  g = [np.asarray(x, np.float64) for x in grads]
  t = len(g)
  if orders is None:
    orders = [[j for j in range(t) if j != i] for i in range(t)]
  gp = [x.copy() for x in g]
  for i in (task_order if task_order is not None else range(t)):
    for j in orders[i]:
      d = float(gp[i] @ g[j])
      if d < 0:
        gp[i] = gp[i] - d / (float(g[j] @ g[j]) + eps) * g[j]
  out = np.sum(gp, axis=0)
  if rescale:
    n = np.linalg.norm(out)
    if n > 0:
      out = out * np.linalg.norm(np.sum(g, axis=0)) / (n + eps)
  return out


# ----------------------------------------------------------------------------- helpers

def _leaf_shapes():
  return jax.tree_util.tree_leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def size():
  return sum(int(np.prod(s)) for s in _leaf_shapes())


def to_tree(flat_tasks, dtype=np.float32):
  """[T, n] task vectors -> pytree of SHAPES with a leading task axis."""
  flat_tasks = np.asarray(flat_tasks)
  t = flat_tasks.shape[0]
  treedef = jax.tree_util.tree_structure(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  leaves, start = [], 0
  for s in _leaf_shapes():
    k = int(np.prod(s))
    leaves.append(jnp.asarray(flat_tasks[:, start:start + k].reshape((t,) + s), dtype))
    start += k
  return jax.tree_util.tree_unflatten(treedef, leaves)


def flat(tree):
  """Pytree (no task axis) -> float64 vector, in tree_leaves order."""
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def flat_tasks(stacked):
  leaves = jax.tree_util.tree_leaves(stacked)
  t = leaves[0].shape[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)


def params_like():
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s, jnp.float32), SHAPES,
                                is_leaf=lambda x: isinstance(x, tuple))


def make_grads(num_tasks, kind, seed=0):
  """Task gradient vectors [T, n] with a known conflict structure."""
  rng = np.random.default_rng(seed)
  n = size()
  r = rng.standard_normal((num_tasks, n))
  if kind == "agree":  # common direction + noise: all cosines clearly positive
    return 1.0 + 0.5 * r
  g = np.empty_like(r)
  g[0] = r[0]
  # cos(g1, g2) ~ -0.6; unequal norms, else the T = 2 AGS direction is the plain sum's
  g[1] = 2.5 * (-0.6 * r[0] + 0.8 * r[1])
  if num_tasks == 3:
    g[2] = 2.0 * (-0.5 * r[0] - 0.5 * r[1] + 0.7 * r[2])  # conflicts with both
  return g


def rel_err(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def first_order(num_tasks, seed=0):
  """The projection order of the first update of a transform built with `seed`."""
  _, sub = jax.random.split(jax.random.key(seed))
  return np.asarray(surgery.projection_order(sub, num_tasks)).tolist()


def run(tx, stacked, params=None):
  params = params_like() if params is None else params
  out, state = tx.update(stacked, tx.init(params), params)  # eager: op caches shared by tests
  return out, state


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("kind", ["conflict", "agree"])
@pytest.mark.parametrize("method", ["ags", "pcgrad", "sum", "mean"])
def test_matches_float64_reference(num_tasks, kind, method):
  g = make_grads(num_tasks, kind, seed=10 * num_tasks)
  g = np.asarray(g, np.float32).astype(np.float64)  # the reference sees the float32 inputs
  stacked = to_tree(g)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  cos = gn @ gn.T
  off = cos[~np.eye(num_tasks, dtype=bool)]
  assert (off < -0.05).all() if kind == "conflict" else (off > 0.3).all()

  orders = first_order(num_tasks, seed=3)
  if method == "ags":
    tx, ref = surgery.adaptive_gradient_surgery(num_tasks, seed=3), ref_surgery(g, orders)
  elif method == "pcgrad":
    tx, ref = surgery.pcgrad(num_tasks, seed=3), ref_surgery(g, orders, rescale=False)
  elif method == "sum":
    tx, ref = surgery.sum_tasks(num_tasks), g.sum(0)
  else:
    tx, ref = surgery.mean_tasks(num_tasks), g.mean(0)
  out, state = run(tx, stacked)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params_like())
  assert rel_err(flat(out), ref) < 1e-5

  d = state.diagnostics
  np.testing.assert_allclose(d.cosine, cos, atol=1e-6)
  np.testing.assert_allclose(d.norm_tasks, np.linalg.norm(g, axis=1), rtol=1e-6)
  np.testing.assert_allclose(d.norm_sum, np.linalg.norm(g.sum(0)), rtol=1e-5)
  np.testing.assert_allclose(d.norm_out, np.linalg.norm(ref), rtol=1e-5)
  projects = method in ("ags", "pcgrad") and kind == "conflict"
  assert bool(d.projected) == projects
  assert not bool(d.degenerate)
  if method == "ags":
    np.testing.assert_allclose(d.norm_out, d.norm_sum, rtol=1e-6)  # the rescale
    np.testing.assert_allclose(
        d.norm_surgered, np.linalg.norm(ref_surgery(g, orders, rescale=False)), rtol=1e-5)
  if kind == "conflict" and method in ("ags", "pcgrad"):
    assert rel_err(ref, g.sum(0)) > 0.05  # the surgery really changes the update
  if kind == "agree" and method in ("ags", "pcgrad"):
    assert rel_err(flat(out), g.sum(0)) < 1e-6  # nothing to project


def test_conflict_reference_differs_from_plain_sum():
  """Guards the test above: the surgery really changes the update in the conflict case."""
  g = make_grads(2, "conflict")
  ags = ref_surgery(g)
  plain = g.sum(0)
  assert rel_err(ags, plain) > 0.1
  np.testing.assert_allclose(np.linalg.norm(ags), np.linalg.norm(plain))


def test_projection_weights_all_orders_t3():
  """Gram-space weights equal the literal loop for every per-task order (T = 3)."""
  g = make_grads(3, "conflict", seed=5)
  gram = jnp.asarray(g @ g.T, jnp.float32)
  results = []
  per_task = [list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)]
  for o0, o1, o2 in itertools.product(*per_task):
    orders = [list(o0), list(o1), list(o2)]
    w, projected = surgery.projection_weights(gram, jnp.asarray(orders, jnp.int32))
    assert bool(projected)
    ref = ref_surgery(g, orders, rescale=False, task_order=[2, 0, 1])
    assert rel_err(np.asarray(w, np.float64) @ g, ref) < 1e-5
    results.append(ref)
  # The order matters for this construction (else the T = 3 tests could not catch it).
  spread = max(rel_err(r, results[0]) for r in results)
  assert spread > 1e-2


def test_t2_independent_of_key_and_t3_deterministic():
  g = make_grads(2, "conflict")
  stacked = to_tree(g)
  outs = []
  for seed in (0, 1, 7):
    tx = surgery.adaptive_gradient_surgery(2, seed=seed)
    state = tx.init(params_like())
    for _ in range(3):
      out, state = tx.update(stacked, state)
      outs.append(flat(out))
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])

  g3 = make_grads(3, "conflict", seed=1)
  stacked3 = to_tree(g3)

  def trajectory(seed):
    tx = surgery.adaptive_gradient_surgery(3, seed=seed)
    state = tx.init(params_like())
    res = []
    for _ in range(6):
      out, state = tx.update(stacked3, state)
      res.append(flat(out))
    return res

  a, b = trajectory(4), trajectory(4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # The key advances: successive updates draw different orders.
  assert max(rel_err(x, a[0]) for x in a) > 1e-3


def test_projection_order_is_random_permutation_of_others():
  keys = jax.random.split(jax.random.key(0), 400)
  orders = np.asarray(jax.vmap(lambda k: surgery.projection_order(k, 4))(keys))
  assert orders.shape == (400, 4, 3)
  for i in range(4):
    others = sorted(j for j in range(4) if j != i)
    assert all(sorted(row) == others for row in orders[:, i].tolist())
    first = np.bincount(orders[:, i, 0], minlength=4)
    assert first[i] == 0 and (first[np.arange(4) != i] > 90).all()  # ~133 each
  assert np.asarray(surgery.projection_order(jax.random.key(0), 1)).shape == (1, 0)


# ----------------------------------------------------------------------------- degenerate cases

@pytest.mark.parametrize("method", ["ags", "pcgrad"])
def test_zero_task_gradient(method):
  g = make_grads(3, "conflict", seed=2)
  g[1] = 0.0
  tx = surgery.adaptive_gradient_surgery(3) if method == "ags" else surgery.pcgrad(3)
  out, state = run(tx, to_tree(g))
  ref = ref_surgery(np.asarray(g, np.float32), first_order(3), rescale=method == "ags")
  assert np.isfinite(flat(out)).all()
  assert rel_err(flat(out), ref) < 1e-5
  d = state.diagnostics
  assert d.cosine[1].tolist() == [0.0, 0.0, 0.0] and float(d.norm_tasks[1]) == 0.0
  assert not bool(d.degenerate)


def test_zero_task_gradient_t2_no_projection():
  g = make_grads(2, "conflict")
  g[1] = 0.0
  out, state = run(surgery.adaptive_gradient_surgery(), to_tree(g))
  assert not bool(state.diagnostics.projected)
  assert rel_err(flat(out), np.asarray(g[0], np.float32)) < 1e-6


@pytest.mark.parametrize("method", ["ags", "pcgrad", "sum", "mean"])
@pytest.mark.parametrize("num_tasks", [1, 2, 3])
def test_all_zero_gives_exact_zero(method, num_tasks):
  tx = {"ags": surgery.adaptive_gradient_surgery, "pcgrad": surgery.pcgrad,
        "sum": surgery.sum_tasks, "mean": surgery.mean_tasks}[method](num_tasks)
  out, state = run(tx, to_tree(np.zeros((num_tasks, size()))))
  assert all(np.asarray(x).tolist() == np.zeros(np.shape(x)).tolist()
             for x in jax.tree_util.tree_leaves(out))
  for x in jax.tree_util.tree_leaves(state.diagnostics):
    assert np.isfinite(np.asarray(x, np.float64)).all()
  assert bool(state.diagnostics.degenerate) == (method == "ags")


@pytest.mark.parametrize("lam", [1.0, 0.3, 2.7])
def test_antiparallel_falls_back_to_plain_sum(lam):
  """g2 = -lam * g1: exact-arithmetic AGS vanishes; the update is the plain sum."""
  g1 = np.random.default_rng(0).standard_normal(size()).astype(np.float32)
  g = np.stack([g1, -np.float32(lam) * g1])  # antiparallel up to float32 rounding
  out, state = run(surgery.adaptive_gradient_surgery(), to_tree(g))
  plain = g.astype(np.float64).sum(0)
  assert bool(state.diagnostics.degenerate) and bool(state.diagnostics.projected)
  assert np.isfinite(flat(out)).all()
  if lam == 1.0:
    np.testing.assert_array_equal(flat(out), 0.0)
  else:
    assert rel_err(flat(out), plain) < 1e-6
    np.testing.assert_allclose(state.diagnostics.norm_out, np.linalg.norm(plain), rtol=1e-5)
  # The surgered vector was at rounding level.
  assert float(state.diagnostics.norm_surgered) < 1e-5 * np.linalg.norm(g1)


def test_antiparallel_authors_rule_amplifies_noise():
  """Why the fallback exists: with rtol=0 (the authors' rule) the float32 update has
  about the plain-sum norm but a direction that is rounding noise (it changes from one
  random gradient to the next; the fallback's direction is the plain sum's, cos = 1)."""
  cosines = []
  for seed in range(4):
    g1 = np.random.default_rng(seed).standard_normal(size()).astype(np.float32)
    g = np.stack([g1, np.float32(-0.3) * g1])
    plain = g.astype(np.float64).sum(0)
    out, state = run(surgery.adaptive_gradient_surgery(rtol=0.0), to_tree(g))
    o = flat(out)
    assert not bool(state.diagnostics.degenerate)
    assert 0.3 < np.linalg.norm(o) / np.linalg.norm(plain) < 3.0  # about full norm
    cosines.append(o @ plain / (np.linalg.norm(o) * np.linalg.norm(plain)))
  assert max(cosines) < 0.99  # never the plain-sum direction
  assert min(cosines) < 0.5  # and sometimes far from it
  out, state = run(surgery.adaptive_gradient_surgery(), to_tree(g))  # the default: fallback
  assert bool(state.diagnostics.degenerate)
  np.testing.assert_allclose(flat(out), plain, rtol=1e-6, atol=1e-6 * np.abs(plain).max())


@pytest.mark.parametrize("rel_delta", [1e-3, 1e-2, 1e-1])
def test_small_real_conflict_uses_exact_rule(rel_delta):
  """g2 = -0.5 g1 + delta, delta well above rounding: the exact rule, not the fallback."""
  rng = np.random.default_rng(1)
  g1 = rng.standard_normal(size())
  delta = rng.standard_normal(size())
  delta *= rel_delta * np.linalg.norm(g1) / np.linalg.norm(delta)
  g = np.stack([g1, -0.5 * g1 + delta]).astype(np.float32).astype(np.float64)
  out, state = run(surgery.adaptive_gradient_surgery(), to_tree(g))
  ref = ref_surgery(g)
  assert not bool(state.diagnostics.degenerate)
  # float32 arithmetic; the surgered vector cancels by ~1/rel_delta (so does any method)
  assert rel_err(flat(out), ref) < 2e-7 / rel_delta
  assert rel_err(ref, g.sum(0)) > 0.3  # really differs from the fallback
  # A large rtol turns the same case into the fallback.
  out2, state2 = run(surgery.adaptive_gradient_surgery(rtol=10 * rel_delta), to_tree(g))
  assert bool(state2.diagnostics.degenerate)
  assert rel_err(flat(out2), g.sum(0)) < 1e-5


def test_pcgrad_antiparallel_returns_tiny_vector():
  g1 = np.random.default_rng(0).standard_normal(size()).astype(np.float32)
  g = np.stack([g1, np.float32(-0.3) * g1])
  out, state = run(surgery.pcgrad(), to_tree(g))
  assert np.linalg.norm(flat(out)) < 1e-5 * np.linalg.norm(g1)
  assert not bool(state.diagnostics.degenerate)


def test_zero_plain_sum_t3_rescales_to_zero():
  """g1 + g2 + g3 = 0 without pairwise antiparallel tasks: the target norm is ~0."""
  rng = np.random.default_rng(3)
  g = rng.standard_normal((3, size()))
  g[2] = -g[0] - g[1]
  g = g.astype(np.float32)
  out, state = run(surgery.adaptive_gradient_surgery(3), to_tree(g))
  assert not bool(state.diagnostics.degenerate)
  assert float(state.diagnostics.norm_surgered) > 0.1 * np.linalg.norm(g[0])
  assert np.linalg.norm(flat(out)) < 1e-5 * np.linalg.norm(g[0])


# ----------------------------------------------------------------------------- T = 1, dtypes

@pytest.mark.parametrize("make", [surgery.adaptive_gradient_surgery, surgery.pcgrad,
                                  surgery.sum_tasks, surgery.mean_tasks])
def test_single_task(make):
  g = make_grads(1, "agree")[:1]
  out, state = run(make(1), to_tree(g))
  assert rel_err(flat(out), np.asarray(g[0], np.float32)) < 1e-6
  assert state.diagnostics.cosine.shape == (1, 1) and float(state.diagnostics.cosine[0, 0]) == 1.0
  assert not bool(state.diagnostics.projected)


def test_mixed_dtypes_and_shapes():
  rng = np.random.default_rng(4)
  shapes = {"a": ((3, 4), jnp.float32), "b": ((5,), jnp.bfloat16), "c": ((), jnp.float32),
            "d": ((2, 1, 3), jnp.float32), "e": ((7,), jnp.float16)}
  g1 = {k: rng.standard_normal(s) for k, (s, _) in shapes.items()}
  stacked = {k: jnp.asarray(np.stack([g1[k], -0.7 * g1[k] + 0.6 * rng.standard_normal(s)]), dt)
             for k, (s, dt) in shapes.items()}
  params = {k: jnp.zeros(s, dt) for k, (s, dt) in shapes.items()}
  tx = surgery.adaptive_gradient_surgery()
  out, state = jax.jit(tx.update)(stacked, tx.init(params), params)
  keys = sorted(shapes)
  g = np.concatenate([np.asarray(stacked[k], np.float64).reshape(2, -1) for k in keys], axis=1)
  ref = ref_surgery(g)
  start = 0
  for k in keys:
    s, dt = shapes[k]
    assert out[k].dtype == dt and out[k].shape == s
    n = int(np.prod(s))
    got, want = np.asarray(out[k], np.float64).ravel(), ref[start:start + n]
    tol = 1e-5 if dt == jnp.float32 else 1e-2  # low-precision leaves: one output rounding
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    start += n
  assert bool(state.diagnostics.projected)
  assert state.diagnostics.norm_out.dtype == jnp.float32


# ----------------------------------------------------------------------------- optax integration

def test_chain_under_jit_matches_manual_sgd():
  lr, wd, mom = 1e-3, 1e-4, 0.9
  tx = optax.chain(surgery.adaptive_gradient_surgery(), optax.add_decayed_weights(wd),
                   optax.sgd(lr, momentum=mom))
  rng = np.random.default_rng(6)
  p = rng.standard_normal(size()).astype(np.float32)
  params = to_tree(p[None])
  params = jax.tree_util.tree_map(lambda x: x[0], params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p_ref, trace = p.astype(np.float64), np.zeros(size())
  for k in range(2):
    g = make_grads(2, "conflict", seed=20 + k).astype(np.float32).astype(np.float64)
    updates, state = step(to_tree(g), state, params)
    params = optax.apply_updates(params, updates)
    trace = ref_surgery(g) + wd * p_ref + mom * trace
    p_ref = p_ref - lr * trace
    np.testing.assert_allclose(flat(params), p_ref, rtol=1e-6, atol=1e-7)
    d = surgery.diagnostics(state)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(d.cosine[0, 1], gn[0] @ gn[1], atol=1e-6)
    assert bool(d.projected)
  assert isinstance(state[0], surgery.SurgeryState)


def test_contract_no_argument_constructors():
  from slamags_jax import losses  # noqa: F401  (the contract's import)
  from slamags_jax import surgery as s
  g = make_grads(2, "conflict", seed=8)
  stacked, params = to_tree(g), params_like()
  g64 = np.asarray(g, np.float32).astype(np.float64)
  expected = {"adaptive_gradient_surgery": ref_surgery(g64),
              "pcgrad": ref_surgery(g64, rescale=False),
              "sum_tasks": g64.sum(0), "mean_tasks": g64.mean(0)}
  for name, ref in expected.items():
    tx = getattr(s, name)()
    assert isinstance(tx, optax.GradientTransformation)
    out = tx.update(stacked, tx.init(params), params)[0]
    assert rel_err(flat(out), ref) < 1e-5, name


def test_diagnostics_helper():
  tx = optax.chain(surgery.sum_tasks(), optax.sgd(0.1))
  state = tx.init(params_like())
  assert isinstance(surgery.diagnostics(state), surgery.SurgeryDiagnostics)
  assert surgery.diagnostics(state[0]) is state[0].diagnostics
  _, state = tx.update(to_tree(make_grads(2, "conflict")), state, params_like())
  assert float(surgery.diagnostics(state).cosine[0, 1]) < -0.3
  with pytest.raises(ValueError, match="no SurgeryState"):
    surgery.diagnostics(optax.sgd(0.1).init(params_like()))


def test_wrong_task_axis_raises():
  tx = surgery.adaptive_gradient_surgery(num_tasks=2)
  with pytest.raises(ValueError, match=r"num_tasks=2"):
    tx.update(to_tree(make_grads(3, "conflict")), tx.init(params_like()))
  with pytest.raises(ValueError, match=r"\['scale'\]"):
    jax.jit(tx.update)({"w": jnp.ones((2, 3)), "scale": jnp.ones(())}, tx.init(None))
  with pytest.raises(ValueError, match="num_tasks must be"):
    surgery.sum_tasks(0)


def test_sharded_leaves_match_unsharded():
  """Global dot products when leaves are split across (2 forced CPU) devices."""
  code = textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from slamags_jax import surgery
      assert len(jax.devices()) == 2
      mesh = Mesh(np.array(jax.devices()), ("x",))
      rng = np.random.default_rng(0)
      g1 = {"w": rng.standard_normal((8, 6)), "v": rng.standard_normal((4,)),
            "k": rng.standard_normal((3, 2, 4))}
      g = {k: np.stack([v, -0.6 * v + 0.8 * rng.standard_normal(v.shape)]).astype(np.float32)
           for k, v in g1.items()}
      tx = surgery.adaptive_gradient_surgery()
      ref, _ = jax.jit(tx.update)(g, tx.init(None))
      sh = {"w": NamedSharding(mesh, P(None, "x", None)), "v": NamedSharding(mesh, P(None, "x")),
            "k": NamedSharding(mesh, P(None, None, None, "x"))}  # minor-axis sharding too
      gs = {k: jax.device_put(v, sh[k]) for k, v in g.items()}
      out, st = jax.jit(tx.update)(gs, tx.init(None))
      assert len(gs["k"].sharding.device_set) == 2
      for k in g:
        scale = float(np.abs(np.asarray(ref[k])).max())  # sums reorder across devices: float32 rounding
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6 * scale)
      print("OK", float(st.diagnostics.cosine[0, 1]))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.startswith("OK")


def test_module_docstring_example_runs():
  failures, tried = doctest.testmod(surgery, verbose=False, report=True)
  assert tried > 5 and failures == 0


# ----------------------------------------------------------------------------- balance_task_norms

def ref_balance(grads):
  """Plain float64 reference: each task's flat gradient scaled to the mean task norm."""
  g = np.asarray(grads, np.float64)
  norms = np.linalg.norm(g, axis=1)
  target = norms.mean()
  return np.stack([gi * (target / n if n > 0 else 0.0) for gi, n in zip(g, norms)])


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_balance_task_norms_matches_float64_reference(num_tasks):
  g = make_grads(num_tasks, "conflict", seed=5)
  g = np.asarray(g, np.float32).astype(np.float64)
  g[0] *= 40.0  # very unequal norms
  out, _ = run(surgery.balance_task_norms(num_tasks=num_tasks), to_tree(g))
  got = flat_tasks(out)
  want = ref_balance(np.asarray(g, np.float32))
  assert rel_err(got, want) < 1e-6
  norms = np.linalg.norm(got, axis=1)
  np.testing.assert_allclose(norms, norms.mean(), rtol=1e-5)


def test_balance_task_norms_keeps_zero_task_zero_and_chains_before_ags():
  g = make_grads(2, "conflict", seed=6)
  g = np.asarray(g, np.float32).astype(np.float64)
  zero = g.copy()
  zero[1] = 0.0
  out, _ = run(surgery.balance_task_norms(), to_tree(zero))
  assert np.all(flat_tasks(out)[1] == 0.0) and np.all(np.isfinite(flat_tasks(out)))
  tx = optax.chain(surgery.balance_task_norms(), surgery.adaptive_gradient_surgery())
  chained, _ = run(tx, to_tree(g))
  balanced = ref_balance(np.asarray(g, np.float32))
  want = ref_surgery(balanced)
  assert rel_err(flat(chained), want) < 1e-5


def test_all_diagnostics_finds_every_partition():
  params = params_like()
  leaves, treedef = jax.tree_util.tree_flatten(params)
  labels = jax.tree_util.tree_unflatten(treedef, ["b"] + ["a"] * (len(leaves) - 1))
  tx = optax.multi_transform({"a": surgery.adaptive_gradient_surgery(), "b": surgery.sum_tasks()}, labels)
  g = make_grads(2, "conflict", seed=7)
  _, state = run(tx, to_tree(np.asarray(g, np.float32)), params)
  assert len(surgery.all_diagnostics(state)) == 2
  first = surgery.diagnostics(state)
  assert np.array_equal(first.norm_tasks, surgery.all_diagnostics(state)[0].norm_tasks)


def test_balance_task_norms_docstring_example_runs():
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner()
  for t in finder.find(surgery.balance_task_norms, "balance_task_norms", globs={}):
    runner.run(t)
  assert runner.failures == 0 and runner.tries > 0
