"""Gram-space weightings: UPGrad, DualProj, MGDA, IMTL-G, Aligned-MTL, ConFIG, Krum, constant, random.

Each computes a weight vector ``w`` from the T x T Gram matrix ``G = J J^T`` alone
(one pass over the gradients) and returns ``sum_t w_t g_t`` (a second pass): no
flattened copy of the parameters, and under sharding the only communication is the
all-reduce of the T x T Gram entries. Definitions, defaults and eps values follow
TorchJD 0.18 (``torchjd.aggregation``); where TorchJD calls an external solver the
QP is solved exactly here (``_qp``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from slamags_jax.surgery._aggregator import aggregator, check_num_tasks, normalize_gram
from slamags_jax.surgery._core import _compute_dtype
from slamags_jax.surgery._qp import dual_cone_weights


def _dtype(updates, gram) -> jnp.dtype:
  """The compute dtype: the Gram matrix's, or (without one) at least float32 of the updates."""
  return gram.dtype if gram is not None else _compute_dtype(jax.tree_util.tree_leaves(updates))


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
  """``a @ x`` elementwise (no TF32 passes on accelerators)."""
  return jnp.sum(a * x[None, :], axis=-1)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _pref(pref_vector: Sequence[float] | None, num_tasks: int, name: str) -> tuple | None:
  if pref_vector is None:
    return None
  pref = tuple(float(x) for x in pref_vector)
  if len(pref) != num_tasks:
    raise ValueError(f"{name}: pref_vector has {len(pref)} entries; it needs num_tasks={num_tasks}")
  return pref


def _pref_array(pref: tuple | None, num_tasks: int, dtype, default: float) -> jax.Array:
  if pref is None:
    return jnp.full((num_tasks,), default, dtype)
  return jnp.asarray(pref, dtype)


def _regularized(gram: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
  g = normalize_gram(gram, norm_eps)
  return g + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def upgrad_weights(gram: jax.Array, pref: jax.Array, norm_eps: float = 1e-4,
                   reg_eps: float = 1e-4) -> jax.Array:
  """UPGrad's weights: the sum over i of the dual-cone projections of ``pref_i e_i``."""
  g = _regularized(gram, norm_eps, reg_eps)
  u = jnp.diag(pref)
  return jnp.sum(jax.vmap(dual_cone_weights, in_axes=(0, None))(u, g), axis=0)


def upgrad(num_tasks: int = 2, pref_vector: Sequence[float] | None = None, *,
           norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> optax.GradientTransformation:
  """UPGrad: projects each task gradient onto the dual cone of all of them, then averages.

  ``sum_i pref_i * pi_J(g_i)`` where ``pi_J`` projects onto ``{x : <x, g_j> >= 0 for
  all j}``; the result never conflicts with any task gradient. Computed in Gram space
  (``G`` divided by its trace, plus ``reg_eps * I``, then an exact dual QP per task).
  Paper: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024).
  TorchJD: ``UPGrad(pref_vector)`` (default pref 1/T; quadprog, same eps).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  >>> tx = surgery.upgrad(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(3)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.293, 1.9, 1.9]
  """
  name = "upgrad"
  check_num_tasks(num_tasks, name)
  pref = _pref(pref_vector, num_tasks, name)

  def combine(updates, gram, extra, key):
    p = _pref_array(pref, num_tasks, gram.dtype, 1.0 / num_tasks)
    return None, upgrad_weights(gram, p, norm_eps, reg_eps), extra
  return aggregator(name, num_tasks, combine)


def dualproj(num_tasks: int = 2, pref_vector: Sequence[float] | None = None, *,
             norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> optax.GradientTransformation:
  """DualProj: projects the weighted mean gradient onto the dual cone of the task gradients.

  ``pi_J(sum_i pref_i g_i)``: the closest vector to the mean that conflicts with no
  task. Paper: Quinton & Rey (2024), after Lopez-Paz & Ranzato, GEM (2017).
  TorchJD: ``DualProj(pref_vector)`` (default pref 1/T).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  >>> tx = surgery.dualproj(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(3)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.556, 1.111, 1.111]
  """
  name = "dualproj"
  check_num_tasks(num_tasks, name)
  pref = _pref(pref_vector, num_tasks, name)

  def combine(updates, gram, extra, key):
    p = _pref_array(pref, num_tasks, gram.dtype, 1.0 / num_tasks)
    return None, dual_cone_weights(p, _regularized(gram, norm_eps, reg_eps)), extra
  return aggregator(name, num_tasks, combine)


def mgda_weights(gram: jax.Array, epsilon: float = 1e-3, max_iters: int = 100) -> jax.Array:
  """TorchJD's MGDA Frank-Wolfe iteration on the simplex, step for step."""
  m = gram.shape[0]
  eye = jnp.eye(m, dtype=gram.dtype)

  def body(carry):
    alpha, it, _ = carry
    ga = jnp.sum(gram * alpha[None, :], axis=1)
    t = jnp.argmin(ga)
    e_t = eye[t]
    a = jnp.sum(alpha * gram[:, t])
    b = jnp.sum(alpha * ga)
    c = gram[t, t]
    gamma = jnp.where(c <= a, 1.0, jnp.where(b <= a, 0.0, (b - a) / jnp.where(
        (c <= a) | (b <= a), 1.0, b + c - 2 * a)))
    alpha = (1 - gamma) * alpha + gamma * e_t
    return alpha, it + 1, gamma < epsilon

  def cond(carry):
    _, it, done = carry
    return (it < max_iters) & ~done

  alpha0 = jnp.full((m,), 1.0 / m, gram.dtype)
  alpha, _, _ = jax.lax.while_loop(cond, body, (alpha0, jnp.zeros((), jnp.int32),
                                                jnp.zeros((), bool)))
  return alpha


def mgda(num_tasks: int = 2, *, epsilon: float = 1e-3,
         max_iters: int = 100) -> optax.GradientTransformation:
  """MGDA: the minimum-norm point of the convex hull of the task gradients.

  ``min_{w in simplex} ||sum_i w_i g_i||``, by Frank-Wolfe on the Gram matrix, stopped
  when the step size drops below ``epsilon`` or after ``max_iters`` (TorchJD's own
  iteration, reproduced step for step, so equal to it in exact arithmetic; the
  tolerance to the true minimiser is that of Frank-Wolfe). Never conflicts with a task
  at the optimum. Paper: Desideri (2012); Sener & Koltun, "Multi-Task Learning as
  Multi-Objective Optimization" (2018). TorchJD: ``MGDA(epsilon=1e-3, max_iters=100)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.mgda(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.8, 0.4]
  """
  name = "mgda"
  check_num_tasks(num_tasks, name)
  if epsilon <= 0 or max_iters < 1:
    raise ValueError(f"{name}: epsilon must be > 0 and max_iters >= 1, got {epsilon}, {max_iters}")

  def combine(updates, gram, extra, key):
    return None, mgda_weights(gram, epsilon, max_iters), extra
  return aggregator(name, num_tasks, combine)


def _pinv_sym(gram: jax.Array, rtol: float) -> jax.Array:
  """Pseudo-inverse of a symmetric matrix, singular values below ``rtol * max`` dropped."""
  lam, vec = jnp.linalg.eigh(gram)
  keep = jnp.abs(lam) > rtol * jnp.max(jnp.abs(lam))
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return _mm(vec * inv[None, :], vec.T)


def imtl_g(num_tasks: int = 2) -> optax.GradientTransformation:
  """IMTL-G: the update whose projections onto every task's unit gradient are equal.

  ``w = G^+ d / sum(G^+ d)`` with ``d_i = ||g_i||`` (zero weights when the sum
  vanishes). Paper: Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021).
  TorchJD: ``IMTLG()``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
  >>> tx = surgery.imtl_g(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.75, 0.75]
  """
  name = "imtl_g"
  check_num_tasks(num_tasks, name)

  def combine(updates, gram, extra, key):
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    v = _mv(_pinv_sym(gram, num_tasks * jnp.finfo(gram.dtype).eps), d)
    s = jnp.sum(v)
    w = jnp.where(jnp.abs(s) < 1e-12, jnp.zeros_like(v), v / jnp.where(jnp.abs(s) < 1e-12, 1.0, s))
    return None, w, extra
  return aggregator(name, num_tasks, combine)


def aligned_mtl_weights(gram: jax.Array, pref: jax.Array, scale_mode: str = "min") -> jax.Array:
  """Aligned-MTL's ``B @ pref`` with TorchJD's rank cut and scale modes."""
  m = gram.shape[0]
  lam, vec = jnp.linalg.eigh(gram)
  tol = jnp.max(lam) * m * jnp.finfo(gram.dtype).eps
  keep = lam > tol
  rank = jnp.sum(keep)
  desc = jnp.sort(jnp.where(keep, lam, -jnp.inf))[::-1]  # kept eigenvalues first
  if scale_mode == "min":
    scale = desc[jnp.maximum(rank - 1, 0)]
  elif scale_mode == "median":  # torch.median: the lower middle value
    scale = desc[jnp.maximum(rank - 1 - (rank - 1) // 2, 0)]
  else:  # "rmse": the mean of the kept eigenvalues
    scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(jnp.maximum(scale, 0.0)) * _mm(vec * inv_sqrt[None, :], vec.T)
  b = jnp.where(rank == 0, jnp.eye(m, dtype=gram.dtype), b)
  return _mv(b, pref)


def aligned_mtl(num_tasks: int = 2, pref_vector: Sequence[float] | None = None, *,
                scale_mode: str = "min") -> optax.GradientTransformation:
  """Aligned-MTL: aligns the task gradients' principal components, then weights them.

  ``w = B pref`` with ``B = sqrt(s) V diag(lambda^-1/2) V^T`` from the eigenvalues of
  ``G`` above rank tolerance; ``s`` is their min, median or mean (``scale_mode``).
  Makes the condition number of the combined system 1. Paper: Senushkin et al.,
  "Independent Component Alignment for Multi-Task Learning" (CVPR 2023).
  TorchJD: ``AlignedMTL(pref_vector, scale_mode="min")``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.aligned_mtl(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.5, 0.5]
  """
  name = "aligned_mtl"
  check_num_tasks(num_tasks, name)
  if scale_mode not in ("min", "median", "rmse"):
    raise ValueError(f"{name}: scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
  pref = _pref(pref_vector, num_tasks, name)

  def combine(updates, gram, extra, key):
    p = _pref_array(pref, num_tasks, gram.dtype, 1.0 / num_tasks)
    return None, aligned_mtl_weights(gram, p, scale_mode), extra
  return aggregator(name, num_tasks, combine)


def con_fig(num_tasks: int = 2, pref_vector: Sequence[float] | None = None
            ) -> optax.GradientTransformation:
  """ConFIG: a conflict-free direction with equal cosine to every task, scaled by projections.

  ``d = pinv(U) pref`` with ``U`` the unit task gradients, ``u = d / ||d||``, output
  ``(sum_i <g_i, u>) u``. In Gram space: ``pinv(U) = U^T (U U^T)^+`` with TorchJD's
  default pinv cut (``max(T, n) * eps`` on the singular values of U, n the parameter
  count). Paper: Liu et al., "ConFIG: Towards Conflict-free Training of Physics
  Informed Neural Networks" (ICLR 2025). TorchJD: ``ConFIG(pref_vector)`` (default 1).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.con_fig(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [1.5, 1.5]
  """
  name = "con_fig"
  check_num_tasks(num_tasks, name)
  pref = _pref(pref_vector, num_tasks, name)

  def combine(updates, gram, extra, key):
    n = sum(x[0].size for x in jax.tree_util.tree_leaves(updates))
    p = _pref_array(pref, num_tasks, gram.dtype, 1.0)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    dinv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    gu = gram * dinv[:, None] * dinv[None, :]
    rtol = max(num_tasks, n) * float(jnp.finfo(gram.dtype).eps)
    c = dinv * _mv(_pinv_sym(gu, rtol * rtol), p)  # singular values of U: sqrt(eig(U U^T))
    cgc = jnp.maximum(jnp.sum(c[:, None] * gram * c[None, :]), 0.0)
    nrm = jnp.maximum(jnp.sqrt(cgc), 1e-12)
    length = jnp.sum(_mv(gram, c)) / nrm
    return None, c * (length / nrm), extra
  return aggregator(name, num_tasks, combine)


def krum(num_tasks: int, n_byzantine: int, n_selected: int = 1) -> optax.GradientTransformation:
  """Krum: averages the ``n_selected`` task gradients closest to their neighbours.

  Score of i: sum of its distances to its ``T - n_byzantine - 2`` nearest other
  gradients (distances from the Gram matrix); the lowest scores are averaged. A
  Byzantine-robust rule. Paper: Blanchard et al., "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent" (NeurIPS 2017). TorchJD: ``Krum(n_byzantine,
  n_selected=1)``; needs ``T >= n_byzantine + 3``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]])}
  >>> tx = surgery.krum(num_tasks=4, n_byzantine=1)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [1.0, 0.0]
  """
  name = "krum"
  check_num_tasks(num_tasks, name)
  if n_byzantine < 0 or n_selected < 1 or num_tasks < n_byzantine + 3 or num_tasks < n_selected:
    raise ValueError(f"{name}: needs n_byzantine >= 0, 1 <= n_selected <= num_tasks and "
                     f"num_tasks >= n_byzantine + 3; got num_tasks={num_tasks}, "
                     f"n_byzantine={n_byzantine}, n_selected={n_selected}")

  def combine(updates, gram, extra, key):
    sq = jnp.diagonal(gram)
    dist = jnp.sqrt(jnp.maximum(sq[None, :] + sq[:, None] - 2 * gram, 0.0))
    closest = jnp.sort(dist, axis=1)[:, 1:num_tasks - n_byzantine - 1]
    scores = jnp.sum(closest, axis=1)
    chosen = jnp.argsort(scores, stable=True)[:n_selected]
    w = jnp.zeros((num_tasks,), gram.dtype).at[chosen].add(1.0 / n_selected)
    return None, w, extra
  return aggregator(name, num_tasks, combine)


def constant_weights(weights: Sequence[float], *, diagnostics: bool = True) -> optax.GradientTransformation:
  """Constant: ``sum_i weights_i g_i`` with fixed weights (one per task).

  The classic weighted-loss baseline, as a transform. TorchJD: ``Constant(weights)``.
  ``diagnostics=False`` skips the Gram pass only the diagnostics need (they stay zero).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.constant_weights([0.5, 2.0])
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.5, 4.0]
  """
  w = tuple(float(x) for x in weights)
  if not w:
    raise ValueError("constant_weights: weights must hold one number per task, got none")

  def combine(updates, gram, extra, key):
    return None, jnp.asarray(w, _dtype(updates, gram)), extra
  return aggregator("constant_weights", len(w), combine, needs_gram=False, diagnostics=diagnostics)


def random_weights(num_tasks: int = 2, seed: int = 0, *, diagnostics: bool = True
                   ) -> optax.GradientTransformation:
  """Random: ``softmax(z)`` weights, ``z ~ N(0, I)`` drawn anew every step (key in the state).

  ``diagnostics=False`` skips the Gram pass only the diagnostics need (they stay zero).

  Paper: Lin et al., "Reasonable Effectiveness of Random Weighting" (TMLR 2022).
  TorchJD: ``Random()``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
  >>> tx = surgery.random_weights(num_tasks=2, seed=0)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> round(float(out["w"].sum()), 6)
  1.0
  """
  name = "random_weights"
  check_num_tasks(num_tasks, name)

  def combine(updates, gram, extra, key):
    z = jax.random.normal(key, (num_tasks,), _dtype(updates, gram))
    return None, jax.nn.softmax(z), extra
  return aggregator(name, num_tasks, combine, seed=seed, needs_gram=False, diagnostics=diagnostics)
