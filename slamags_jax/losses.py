"""Pretraining losses (pure jnp): SimCLR NT-Xent, the similarity loss, bag-label CE.

Definitions as in docs/reference, "Pretraining". All losses compute in at least float32
(bfloat16 / float16 inputs are upcast; float64 stays float64 under x64) and return a
scalar of that dtype. Embeddings are L2-normalised with a guard: a zero vector stays
zero (cosine 0 with everything) and has finite gradients.

Why not ``optax.losses.ntxent`` (the same loss for labels ``[0..B-1, 0..B-1]``; the
tests check ``nt_xent`` against it): it builds the cosine matrix by broadcasting (an
``[N, N, D]`` product instead of a matmul), computes in the input dtype (bf16) and
clips small norms instead of normalising them. Nor optax's cross-entropy on the masked
logits: ``logsumexp - positive`` cancels when the positive dominates (a small loss
loses its relative precision, and its gradient too); ``nt_xent`` below uses the
equivalent ``softplus(logsumexp(negatives) - positive)``, accurate in both regimes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # on the norm, as torch.nn.functional.normalize
_MASK = -1e9  # logit of excluded pairs: exp underflows to exactly 0

__all__ = ["bag_label_cross_entropy", "l2_normalize", "nt_xent", "similarity_loss"]


def _float(x: jax.Array) -> jax.Array:
  """Upcast to at least float32 (keeps float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _NORM_EPS) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis``; zero vectors stay zero, gradients finite.

  ``rsqrt(max(||x||^2, eps^2))`` never takes sqrt at 0, so the gradient at 0 is finite.
  """
  x = _float(x)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.07) -> jax.Array:
  """SimCLR NT-Xent over two views ``z1, z2 [B, D]`` of the same B patches.

  The 2B embeddings are L2-normalised; anchor i's logits are ``cos(z_i, z_k) / t``
  over the other 2B - 1 views, its positive the partner view; the loss
  ``-log(exp(pos) / sum_{k != i} exp(logit_k))`` is averaged over the 2B anchors.
  Written as ``softplus(logsumexp(negatives) - pos)`` (the same value, stable, and
  relatively accurate when the loss is small); self and partner are excluded from
  the negatives with a large negative logit (exactly 0 after exp), not by slicing.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"nt_xent: z1 and z2 must both be [B, D], got {z1.shape} and {z2.shape}")
  b = z1.shape[0]
  n = 2 * b
  z = l2_normalize(jnp.concatenate([_float(z1), _float(z2)], axis=0))
  logits = jnp.matmul(z, z.T, precision=_HIGHEST) / temperature
  idx = jnp.arange(n)
  partner = (idx + b) % n
  positive = logits[idx, partner]
  excluded = (idx[:, None] == idx[None, :]) | (partner[:, None] == idx[None, :])
  negatives = jnp.where(excluded, jnp.asarray(_MASK, logits.dtype), logits)
  per_anchor = jax.nn.softplus(jax.nn.logsumexp(negatives, axis=1) - positive)
  return jnp.mean(per_anchor)


def similarity_loss(views: jax.Array, temperature: float = 0.07) -> jax.Array:
  """Pull-only similarity loss over views ``[B, V, D]`` (M = B * V embeddings).

  ``mean_i (1 / t) * (1 - mean_{j != i} cos(z_i, z_j))`` over the L2-normalised
  embeddings. Computed in O(M * D) with the sum of the normalised vectors:
  ``sum_{i != j} cos(z_i, z_j) = ||sum_i z_i||^2 - sum_i ||z_i||^2`` (``||z_i||^2``
  is 1, or 0 for a zero vector, whose cosines are 0); equal to the pairwise form
  (tested against it in float64).
  """
  if views.ndim != 3:
    raise ValueError(f"similarity_loss: views must be [B, V, D], got {views.shape}")
  m = views.shape[0] * views.shape[1]
  if m < 2:
    raise ValueError(f"similarity_loss: needs at least 2 embeddings, got B * V = {m}")
  z = l2_normalize(views.reshape(m, views.shape[2]))
  total = jnp.sum(z, axis=0)
  off_diagonal = jnp.sum(jnp.square(total)) - jnp.sum(jnp.square(z))
  mean_cos = off_diagonal / (m * (m - 1))
  return (1.0 - mean_cos) / temperature


def bag_label_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Weakly supervised baseline: softmax CE of patch logits ``[B, C]`` against the
  integer label ``[B]`` inherited from the patch's bag, mean over the batch (optax)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_float(logits), labels))
