"""Exact small quadratic programs on a T x T Gram matrix, by active-set enumeration.

With a static task count T <= 8 every active set can be tried at once: 2^T small
linear solves (256 of 8 x 8 at most), batched, then the one whose KKT conditions hold
best is kept. For a positive definite G the KKT point is unique, so this is the exact
solution up to the rounding of the linear solves (float64: about 1e-12 relative for a
well-conditioned G), with no iteration count or tolerance to tune; jit-compatible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _subsets(num_tasks: int) -> jax.Array:
  """bool ``[2^T, T]``: row k is the binary expansion of k."""
  k = jnp.arange(2 ** num_tasks)[:, None]
  return ((k >> jnp.arange(num_tasks)[None, :]) & 1).astype(bool)


def dual_cone_weights(u: jax.Array, gram: jax.Array) -> jax.Array:
  """``argmin_v v^T G v`` subject to ``v >= u`` (elementwise), for one ``u`` of shape [T].

  The dual form of projecting ``J^T u`` onto the dual cone of the rows of J
  (UPGrad paper, Proposition 1; TorchJD's ``DualConeProjector``). KKT: ``G v = lam``,
  ``lam >= 0``, ``v >= u``, ``lam_i (v_i - u_i) = 0``. For each free set F
  (``v_F > u_F``, ``lam_F = 0``): ``v_N = u_N`` and ``G_FF v_F = -G_FN u_N``.
  """
  num_tasks = u.shape[0]
  free = _subsets(num_tasks)  # [S, T]
  eye = jnp.eye(num_tasks, dtype=gram.dtype)
  pair = free[:, :, None] & free[:, None, :]
  # Row i in F: sum_{j in F} G_ij v_j = -sum_{j not in F} G_ij u_j; row i not in F: v_i = u_i.
  a = jnp.where(pair, gram[None], 0.0) + jnp.where(free[:, :, None], 0.0, eye[None])
  fixed_u = jnp.where(free, 0.0, u[None, :])  # [S, T]
  rhs = jnp.where(free, -jnp.sum(gram[None] * fixed_u[:, None, :], axis=2), u[None, :])
  v = jnp.linalg.solve(a, rhs[..., None])[..., 0]  # [S, T]
  lam = jnp.sum(gram[None] * v[:, None, :], axis=2)
  scale = jnp.maximum(jnp.max(jnp.abs(u)), 1e-30)
  violation = (jnp.sum(jnp.maximum(u[None] - v, 0.0), axis=1)
               + jnp.sum(jnp.where(free, 0.0, jnp.maximum(-lam, 0.0)), axis=1)) / scale
  violation = jnp.where(jnp.all(jnp.isfinite(v), axis=1), violation, jnp.inf)
  return v[jnp.argmin(violation)]


def simplex_qp(a: jax.Array, gram: jax.Array, k: jax.Array) -> jax.Array:
  """``argmin_w a^T w + k/2 w^T G w`` over the probability simplex (w >= 0, sum w = 1).

  KKT on a support S: ``k G_SS w_S + a_S = mu 1``, ``sum w_S = 1``; off S:
  ``a_i + k (G w)_i >= mu``. Solved for every non-empty S, the best KKT point kept.
  """
  num_tasks = a.shape[0]
  sup = _subsets(num_tasks)[1:]  # [S, T], non-empty
  pair = sup[:, :, None] & sup[:, None, :]
  eye = jnp.eye(num_tasks, dtype=gram.dtype)
  top = jnp.where(pair, k * gram[None], 0.0) + jnp.where(sup[:, :, None], 0.0, eye[None])
  col = jnp.where(sup, -1.0, 0.0)[:, :, None]  # -mu in rows of S
  last = jnp.concatenate([sup.astype(gram.dtype), jnp.zeros((sup.shape[0], 1), gram.dtype)], 1)
  mat = jnp.concatenate([jnp.concatenate([top, col], 2), last[:, None, :]], 1)  # [S, n, n]
  rhs = jnp.concatenate([jnp.where(sup, -a[None], 0.0), jnp.ones((sup.shape[0], 1), gram.dtype)], 1)
  sol = jnp.linalg.solve(mat, rhs[..., None])[..., 0]
  w, mu = sol[:, :num_tasks], sol[:, num_tasks]
  grad = a[None] + k * jnp.sum(gram[None] * w[:, None, :], axis=2)
  scale = jnp.maximum(jnp.max(jnp.abs(grad), axis=1), 1e-30)
  violation = (jnp.sum(jnp.maximum(-w, 0.0), axis=1)
               + jnp.sum(jnp.where(sup, 0.0, jnp.maximum(mu[:, None] - grad, 0.0)), axis=1) / scale)
  violation = jnp.where(jnp.all(jnp.isfinite(sol), axis=1), violation, jnp.inf)
  return jnp.maximum(w[jnp.argmin(violation)], 0.0)
