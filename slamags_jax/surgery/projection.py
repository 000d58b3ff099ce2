"""Projection transforms: adaptive gradient surgery, PCGrad, sum, mean, task-norm balancing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from slamags_jax.surgery._aggregator import aggregator, check_num_tasks, state_dtype
from slamags_jax.surgery._core import (
  SurgeryDiagnostics,
  SurgeryState,
  _check_task_axis,
  _compute_dtype,
  _cosine,
  _empty_diagnostics,
  _quad,
  _wsum,
  gram_matrix,
  weighted_task_sum,
)


def projection_order(key: jax.Array, num_tasks: int) -> jax.Array:
  """Row i: the other tasks in a random order (int32 ``[T, T - 1]``).

  An independent uniform permutation per row (argsort of uniforms, self sorted last).
  """
  u = jax.random.uniform(key, (num_tasks, num_tasks))
  u = jnp.where(jnp.eye(num_tasks, dtype=bool), 2.0, u)
  return jnp.argsort(u, axis=1)[:, : num_tasks - 1].astype(jnp.int32)


def projection_weights(
    gram: jax.Array, order: jax.Array, eps: float = 1e-10
) -> tuple[jax.Array, jax.Array]:
  """PCGrad projections in Gram space: ``(w, projected)`` with ``sum_i g'_i = sum_k w_k g_k``.

  ``order[i]`` lists the tasks g'_i is projected against, in order. Row i of ``A``
  holds the coefficients of g'_i; ``<g'_i, g_j> = sum_m A[i, m] G[m, j]``.
  Elementwise arithmetic only (no small matmuls that accelerators round to TF32).
  """
  num_tasks = gram.shape[0]
  rows = jnp.arange(num_tasks)
  coeffs = jnp.eye(num_tasks, dtype=gram.dtype)
  projected = jnp.zeros((), bool)
  for step in range(order.shape[1]):  # static, T - 1 steps
    j = order[:, step]
    dot = jnp.sum(coeffs * gram[j], axis=1)  # <g'_i, g_{j_i}>
    conflict = dot < 0
    c = jnp.where(conflict, dot / (gram[j, j] + eps), 0.0)
    coeffs = coeffs.at[rows, j].add(-c)
    projected = projected | jnp.any(conflict)
  return jnp.sum(coeffs, axis=0), projected


def adaptive_gradient_surgery(
    num_tasks: int = 2, seed: int = 0, *, eps: float = 1e-10, rtol: float = 1e-5
) -> optax.GradientTransformation:
  """SLAM-AGS: PCGrad projection, sum, rescale to ``||sum_i g_i||`` (module docs).

  Args:
    num_tasks: T, the size of the leading task axis of every update leaf.
    seed: seeds the PRNG key of the projection order (used when T > 2).
    eps: the reference's 1e-10 in the projection and rescale denominators.
    rtol: degenerate-case threshold: plain sum when ``||g|| <= rtol * sqrt(sum_i ||g_i||^2)``.
  """
  return _transform("ags", num_tasks, seed, eps, rtol)


def pcgrad(
    num_tasks: int = 2, seed: int = 0, *, eps: float = 1e-10
) -> optax.GradientTransformation:
  """PCGrad: the AGS projection and sum, no rescale, no degenerate fallback.

  Each ``g_i`` is projected onto the normal plane of every ``g_j`` it conflicts with
  (others in a random order per task, key in the state), then the projections are
  summed. Paper: Yu et al., "Gradient Surgery for Multi-Task Learning" (NeurIPS 2020).
  TorchJD: ``PCGrad()`` (no eps; here ``eps`` = 1e-10 in the denominators).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
  >>> tx = surgery.pcgrad(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.5, 1.5]
  """
  return _transform("pcgrad", num_tasks, seed, eps, 0.0)


def sum_tasks(num_tasks: int = 2, *, diagnostics: bool = True) -> optax.GradientTransformation:
  """Plain sum over the task axis (WeakSupCon; T = 1 for single-task methods).

  The sum of the losses' gradient. TorchJD: ``Sum()``. ``diagnostics=False`` skips the
  Gram pass that only the diagnostics need (they stay zero): one pass over the updates.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
  >>> out, _ = surgery.sum_tasks(2).update(g, surgery.sum_tasks(2).init(None))
  >>> [float(x) for x in out["w"]]
  [0.0, 1.0]
  """
  return _transform("sum", num_tasks, 0, 0.0, 0.0, diagnostics)


def mean_tasks(num_tasks: int = 2, *, diagnostics: bool = True) -> optax.GradientTransformation:
  """Plain mean over the task axis. TorchJD: ``Mean()``. ``diagnostics``: as ``sum_tasks``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
  >>> out, _ = surgery.mean_tasks(2).update(g, surgery.mean_tasks(2).init(None))
  >>> [float(x) for x in out["w"]]
  [0.0, 0.5]
  """
  return _transform("mean", num_tasks, 0, 0.0, 0.0, diagnostics)


def balance_task_norms(num_tasks: int = 2, *, eps: float = 1e-12) -> optax.GradientTransformation:
  """Rescales each task's gradient to the mean of the task-gradient norms (stacked in and out).

  ``g_i <- g_i * mean_k ||g_k|| / max(||g_i||, eps)`` over the whole pytree (a zero
  gradient stays zero). It keeps the task axis, so it goes *before* a combining
  transform: with very unequal norms the larger task decides the direction of the sum
  and of AGS's rescale target; balanced, each task gets the same say while the total
  scale (the mean norm) stays that of the inputs. A gradient-level analogue of task
  weights that needs no tuning (GradNorm-style balancing without the learned weights).

  >>> import jax.numpy as jnp, optax
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}  # stacked: task norms 5 and 1
  >>> balanced, _ = surgery.balance_task_norms().update(g, None)
  >>> [round(float(x), 4) for x in jnp.linalg.norm(balanced["w"], axis=1)]
  [3.0, 3.0]
  >>> tx = optax.chain(surgery.balance_task_norms(), surgery.adaptive_gradient_surgery())
  >>> params = {"w": jnp.zeros(2)}
  >>> update, _ = tx.update(g, tx.init(params), params)
  >>> update["w"].shape
  (2,)
  """
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"balance_task_norms: num_tasks must be an int >= 1, got {num_tasks!r}")

  def update_fn(updates, state, params=None):
    del params
    _check_task_axis(updates, num_tasks, "balance_task_norms")
    gram = gram_matrix(updates)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    target = jnp.mean(norms)
    scale = jnp.where(norms > 0, target / jnp.maximum(norms, eps), 0.0)

    def one(leaf):
      dtype = jnp.promote_types(leaf.dtype, scale.dtype)
      s = scale.astype(dtype).reshape((num_tasks,) + (1,) * (leaf.ndim - 1))
      return (leaf.astype(dtype) * s).astype(leaf.dtype)
    return jax.tree_util.tree_map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------- internals

def _transform(method: str, num_tasks: int, seed: int, eps: float, rtol: float,
               diagnostics: bool = True) -> optax.GradientTransformation:
  name = {"ags": "adaptive_gradient_surgery", "pcgrad": "pcgrad",
          "sum": "sum_tasks", "mean": "mean_tasks"}[method]
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"{name}: num_tasks must be an int >= 1, got {num_tasks!r}")
  if eps < 0 or rtol < 0:
    raise ValueError(f"{name}: eps and rtol must be >= 0, got eps={eps}, rtol={rtol}")

  def init_fn(params):
    del params  # no per-parameter state
    key = jax.random.key_data(jax.random.key(seed))
    return SurgeryState(key=key, diagnostics=_empty_diagnostics(num_tasks))

  def update_fn(updates, state, params=None):
    del params  # not needed (and without the task axis)
    leaves = _check_task_axis(updates, num_tasks, name)
    if not diagnostics:  # only sum_tasks / mean_tasks pass it: the weighted sum, no Gram pass
      w = jnp.full((num_tasks,), 1.0 if method == "sum" else 1.0 / num_tasks, _compute_dtype(leaves))
      return weighted_task_sum(updates, w), state
    gram = gram_matrix(updates)
    dtype = gram.dtype
    ones = jnp.ones((num_tasks,), dtype)
    norm_tasks = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    key = state.key
    projected = jnp.zeros((), bool)
    degenerate = jnp.zeros((), bool)

    if method in ("ags", "pcgrad"):
      new_key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
      key = jax.random.key_data(new_key)
      order = projection_order(sub, num_tasks)
      w, projected = projection_weights(gram, order, eps)
    elif method == "sum":
      w = ones
    else:
      w = ones / num_tasks

    if method == "ags":
      # Norms of g = sum_k w_k g_k and of the plain sum, measured on the vectors (module docs).
      n2 = jnp.zeros((), dtype)
      s2 = jnp.zeros((), dtype)
      for leaf in leaves:
        x = leaf.astype(dtype)
        n2 = n2 + jnp.sum(jnp.square(_wsum(x, w)))
        s2 = s2 + jnp.sum(jnp.square(_wsum(x, ones)))
      norm_surgered, norm_sum = jnp.sqrt(n2), jnp.sqrt(s2)
      degenerate = n2 <= (rtol * rtol) * jnp.trace(gram)
      scale = jnp.where(norm_surgered > 0, norm_sum / (norm_surgered + eps), 1.0)
      w = jnp.where(degenerate, ones, w * scale)
      norm_out = jnp.where(degenerate, norm_sum, norm_surgered * scale)
    else:
      norm_sum = jnp.sqrt(_quad(gram, ones))
      norm_surgered = norm_out = jnp.sqrt(_quad(gram, w))

    out = weighted_task_sum(updates, w)
    f = jnp.float32
    diag = SurgeryDiagnostics(
        cosine=_cosine(gram).astype(f), projected=projected, degenerate=degenerate,
        norm_tasks=norm_tasks.astype(f), norm_sum=norm_sum.astype(f),
        norm_surgered=norm_surgered.astype(f), norm_out=norm_out.astype(f))
    return out, SurgeryState(key=key, diagnostics=diag)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- GradVac

def gradvac_weights(gram: jax.Array, phi_hat: jax.Array, order: jax.Array, beta: float,
                    eps: float) -> tuple[jax.Array, jax.Array]:
  """GradVac in Gram space: ``(w, new_phi_hat)``, TorchJD's loop with every row i at once.

  Row i of ``coeffs`` holds g'_i; against each j (in ``order[i]``), when the cosine
  ``phi`` of ``<g'_i, g_j>`` is below the target ``phi_hat[i, j]``, adds
  ``||g'_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2) + eps) g_j``;
  then ``phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi``.
  """
  num_tasks = gram.shape[0]
  rows = jnp.arange(num_tasks)
  coeffs = jnp.eye(num_tasks, dtype=gram.dtype)
  dtype = phi_hat.dtype
  for step in range(order.shape[1]):  # static, T - 1 steps
    j = order[:, step]
    cg = jnp.sum(coeffs[:, :, None] * gram[None], axis=1)  # row i: G c_i
    dot = cg[rows, j]
    norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * coeffs, axis=1), 0.0))
    norm_j = jnp.sqrt(jnp.maximum(gram[j, j], 0.0))
    phi = dot / (norm_i * norm_j + eps)
    hat = phi_hat[rows, j].astype(gram.dtype)
    s_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
    s_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
    add = norm_i * (hat * s_phi - phi * s_hat) / (norm_j * s_hat + eps)
    coeffs = coeffs.at[rows, j].add(jnp.where(phi < hat, add, 0.0))
    phi_hat = phi_hat.at[rows, j].set(((1.0 - beta) * hat + beta * phi).astype(dtype))
  return jnp.sum(coeffs, axis=0), phi_hat


def gradvac(num_tasks: int = 2, seed: int = 0, *, beta: float = 0.5,
            eps: float = 1e-8) -> optax.GradientTransformation:
  """GradVac: pulls each task gradient towards a moving-average target cosine with every other.

  PCGrad's loop (per task i, the others in random order) with the fixed target 0
  replaced by ``phi_hat[i, j]``, an exponential moving average (rate ``beta``) of the
  observed cosines kept in the optax state; then the sum. Paper: Wang et al.,
  "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
  Multilingual Models" (ICLR 2021). TorchJD: ``GradVac(beta=0.5, eps=1e-8)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
  >>> tx = surgery.gradvac(num_tasks=2)
  >>> out, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.5, 1.5]
  """
  name = "gradvac"
  check_num_tasks(num_tasks, name)
  if not 0.0 <= beta <= 1.0 or eps < 0:
    raise ValueError(f"{name}: needs 0 <= beta <= 1 and eps >= 0, got beta={beta}, eps={eps}")

  def combine(updates, gram, phi_hat, key):
    order = projection_order(key, num_tasks)
    w, phi_hat = gradvac_weights(gram, phi_hat, order, beta, eps)
    return None, w, phi_hat
  return aggregator(name, num_tasks, combine, seed=seed, init_extra=lambda params: jnp.zeros(
      (num_tasks, num_tasks), state_dtype(params)))
