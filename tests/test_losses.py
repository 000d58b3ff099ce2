"""Tests of slamags_jax.losses against NumPy float64 implementations of the definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamags_jax import losses

# ----------------------------------------------------------------------------- references

def ref_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ref_logsumexp(v):
  m = np.max(v)
  return m + np.log(np.sum(np.exp(v - m)))


def ref_nt_xent(z1, z2, t):
  """Per anchor: -log(exp(cos(i, partner)/t) / sum_{k != i} exp(cos(i, k)/t)); mean."""
  b = len(z1)
  z = ref_normalize(np.concatenate([z1, z2]))
  n = 2 * b
  out = []
  for i in range(n):
    partner = (i + b) % n
    others = np.array([z[i] @ z[k] / t for k in range(n) if k != i])
    out.append(ref_logsumexp(others) - z[i] @ z[partner] / t)
  return np.mean(out)


def ref_similarity(views, t):
  """Pairwise: mean_i (1/t) (1 - mean_{j != i} cos(z_i, z_j))."""
  z = ref_normalize(np.asarray(views, np.float64).reshape(-1, views.shape[-1]))
  m = len(z)
  per = [(1.0 - np.mean([z[i] @ z[j] for j in range(m) if j != i])) / t for i in range(m)]
  return np.mean(per)


def rel(a, b):
  return abs(float(a) - b) / abs(b)


def x64():
  """Context manager enabling float64 for the block and restoring the setting after."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # older jax
  return enable_x64()


# ----------------------------------------------------------------------------- nt_xent

@pytest.mark.parametrize("b,d,t", [(4, 8, 0.07), (7, 5, 0.5), (16, 32, 0.07)])
def test_nt_xent_matches_reference(b, d, t):
  rng = np.random.default_rng(b)
  z1 = rng.standard_normal((b, d)).astype(np.float32)
  z2 = (z1 + 0.5 * rng.standard_normal((b, d))).astype(np.float32)  # positives are close
  loss = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=t)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert rel(loss, ref_nt_xent(z1, z2, t)) < 1e-5


def test_nt_xent_equals_optax_ntxent():
  rng = np.random.default_rng(0)
  z1, z2 = rng.standard_normal((2, 6, 10)).astype(np.float32)
  labels = jnp.concatenate([jnp.arange(6), jnp.arange(6)])
  want = jax.jit(optax.losses.ntxent)(jnp.concatenate([z1, z2]), labels, temperature=0.07)
  np.testing.assert_allclose(losses.nt_xent(z1, z2, temperature=0.07), want, rtol=1e-5)


def test_nt_xent_single_pair_is_zero():
  """B = 1: the denominator holds only the partner, so every anchor's loss is 0."""
  z = np.random.default_rng(1).standard_normal((2, 1, 4)).astype(np.float32)
  assert abs(float(losses.nt_xent(z[0], z[1]))) < 1e-6


def test_nt_xent_bfloat16_and_extreme_scales():
  rng = np.random.default_rng(2)
  z1 = jnp.asarray(rng.standard_normal((5, 6)), jnp.bfloat16)
  z2 = jnp.asarray(rng.standard_normal((5, 6)), jnp.bfloat16)
  loss = losses.nt_xent(z1, z2)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  want = ref_nt_xent(np.asarray(z1, np.float64), np.asarray(z2, np.float64), 0.07)
  assert rel(loss, want) < 1e-5
  # Huge embeddings and a tiny temperature (logits up to 1000): still finite and exact.
  a = 1e4 * rng.standard_normal((5, 6)).astype(np.float32)
  c = 1e4 * rng.standard_normal((5, 6)).astype(np.float32)
  loss = losses.nt_xent(a, c, temperature=1e-3)
  assert np.isfinite(float(loss))
  assert rel(loss, ref_nt_xent(a, c, 1e-3)) < 1e-5


def test_nt_xent_zero_vector_finite():
  rng = np.random.default_rng(3)
  z1 = rng.standard_normal((4, 5)).astype(np.float32)
  z2 = rng.standard_normal((4, 5)).astype(np.float32)
  z1[2] = 0.0
  loss, grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(z1, z2)
  assert rel(loss, ref_nt_xent(z1, z2, 0.07)) < 1e-5
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_nt_xent_rejects_bad_shapes():
  with pytest.raises(ValueError, match="nt_xent"):
    losses.nt_xent(jnp.ones((3, 4)), jnp.ones((2, 4)))


# ----------------------------------------------------------------------------- similarity

@pytest.mark.parametrize("b,v,d,t", [(3, 2, 8, 0.07), (5, 3, 4, 0.07), (64, 2, 16, 0.2)])
def test_similarity_matches_pairwise_reference(b, v, d, t):
  rng = np.random.default_rng(b * v)
  views = (0.3 + rng.standard_normal((b, v, d))).astype(np.float32)
  loss = losses.similarity_loss(jnp.asarray(views), temperature=t)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert rel(loss, ref_similarity(views, t)) < 1e-5


def test_similarity_bfloat16_identical_and_zero_vectors():
  rng = np.random.default_rng(4)
  views = jnp.asarray(rng.standard_normal((4, 2, 6)), jnp.bfloat16)
  loss = losses.similarity_loss(views)
  assert loss.dtype == jnp.float32
  assert rel(loss, ref_similarity(np.asarray(views, np.float64), 0.07)) < 1e-5
  # All embeddings in one direction (any scale): cos = 1 everywhere, the loss is 0.
  same = np.ones((8, 2, 5), np.float32) * rng.uniform(0.1, 10, (8, 2, 1)).astype(np.float32)
  assert abs(float(losses.similarity_loss(same))) < 1e-5
  # A zero embedding: cos 0 with all; loss and gradients finite.
  views = rng.standard_normal((3, 2, 5)).astype(np.float32)
  views[1, 0] = 0.0
  loss, grad = jax.value_and_grad(losses.similarity_loss)(views)
  assert rel(loss, ref_similarity(views, 0.07)) < 1e-5
  assert np.isfinite(np.asarray(grad)).all()


def test_similarity_rejects_bad_shapes():
  with pytest.raises(ValueError, match="at least 2"):
    losses.similarity_loss(jnp.ones((1, 1, 4)))
  with pytest.raises(ValueError, match=r"\[B, V, D\]"):
    losses.similarity_loss(jnp.ones((4, 4)))


# ----------------------------------------------------------------------------- gradients

def _finite_difference(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
  return g


def test_gradients_by_finite_differences():
  rng = np.random.default_rng(5)
  z1 = rng.standard_normal((3, 4))
  z2 = rng.standard_normal((3, 4))
  views = rng.standard_normal((3, 2, 4))
  # Inputs are passed as arguments, never closed over: jax caches the conversion of a
  # closed-over NumPy constant, and a float64 one would leak out of the x64 block.
  nt = jax.jit(lambda a, b: losses.nt_xent(a, b, temperature=0.5))
  sim = jax.jit(lambda v: losses.similarity_loss(v, temperature=0.5))
  with x64():
    assert jnp.asarray(z1).dtype == jnp.float64
    for argnum, x in ((0, z1), (1, z2)):  # both views' gradients of nt_xent
      def f(a, argnum=argnum):
        return nt(a, z2) if argnum == 0 else nt(z1, a)
      auto = np.asarray(jax.grad(nt, argnums=argnum)(z1, z2))
      assert auto.dtype == np.float64
      fd = _finite_difference(f, x)
      assert np.linalg.norm(auto - fd) / np.linalg.norm(fd) < 1e-6
    auto = np.asarray(jax.grad(sim)(views))
    fd = _finite_difference(sim, views)
    assert np.linalg.norm(auto - fd) / np.linalg.norm(fd) < 1e-6
    # The O(M * D) form equals the pairwise definition to float64 precision.
    assert rel(sim(views), ref_similarity(views, 0.5)) < 1e-12
    assert rel(nt(z1, z2), ref_nt_xent(z1, z2, 0.5)) < 1e-12
  assert not jax.config.jax_enable_x64 and jnp.asarray(z1).dtype == jnp.float32


# ----------------------------------------------------------------------------- CE, contract

def test_bag_label_cross_entropy():
  rng = np.random.default_rng(6)
  logits = rng.standard_normal((8, 3)).astype(np.float32) * 5
  labels = rng.integers(0, 3, 8)
  x = logits.astype(np.float64)
  want = np.mean([np.log(np.sum(np.exp(x[i]))) - x[i, labels[i]] for i in range(8)])
  got = losses.bag_label_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == () and rel(got, want) < 1e-5
  got16 = losses.bag_label_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  assert got16.dtype == jnp.float32


def test_contract_scalars_under_jit():
  rng = np.random.default_rng(7)
  z1, z2 = rng.standard_normal((2, 4, 8)).astype(np.float32)
  views = rng.standard_normal((4, 2, 8)).astype(np.float32)
  a = jax.jit(losses.nt_xent, static_argnames="temperature")(z1, z2, temperature=0.07)
  b = jax.jit(losses.similarity_loss)(views, temperature=0.07)
  assert a.shape == () and b.shape == ()
  np.testing.assert_allclose(a, losses.nt_xent(z1, z2, temperature=0.07), rtol=1e-6)
  np.testing.assert_allclose(b, ref_similarity(views, 0.07), rtol=1e-5)
