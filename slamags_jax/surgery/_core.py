"""Shared pieces of the surgery transforms: state, diagnostics, the Gram matrix, input checks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SurgeryDiagnostics(NamedTuple):
  """What one update did, for logging (float32 / bool, fixed shapes).

  Norms marked (Gram) come from the Gram matrix: exact up to float32 cancellation,
  about 1e-7 * sum_i ||g_i||^2 in the squared norm; AGS measures its norms directly.
  """
  cosine: jax.Array  # [T, T] cosine between task gradients; 0 where one is zero
  projected: jax.Array  # bool []: some g'_i was projected; other aggregators: some <g_i, g_j> < 0
  degenerate: jax.Array  # bool []: AGS fell back to the plain sum (module docs)
  norm_tasks: jax.Array  # [T] ||g_i||
  norm_sum: jax.Array  # [] ||sum_i g_i|| (Gram, except AGS)
  norm_surgered: jax.Array  # [] norm of the combination before any rescale (Gram, except AGS)
  norm_out: jax.Array  # [] norm of the returned update (Gram, except AGS)


class SurgeryState(NamedTuple):
  """State of every transform here: the order key and the last diagnostics."""
  key: jax.Array  # uint32 raw key data (checkpoint-friendly); wrap_key_data to use
  diagnostics: SurgeryDiagnostics


class AggregatorState(NamedTuple):
  """State of the aggregators with memory: key, diagnostics, and their own ``extra`` pytree.

  A separate class (not a new field of ``SurgeryState``) so that checkpoints of the
  existing transforms keep their tree structure.
  """
  key: jax.Array  # uint32 raw key data, as in SurgeryState
  diagnostics: SurgeryDiagnostics
  extra: Any  # moving averages, step counters, previous weights (per transform)


def _is_state(x: Any) -> bool:
  return isinstance(x, (SurgeryState, AggregatorState))


def gram_matrix(stacked: Any) -> jax.Array:
  """``G[t, s] = <g_t, g_s>`` over the whole pytree (leaves ``[T, ...]``).

  One elementwise product-and-sum per task pair and leaf, in at least float32
  (elementwise, so no TF32/bf16 passes on accelerators); global under sharding.
  Written on the task slices ``leaf[t]`` rather than as one ``[T, n] x [n, T]``
  dot_general: when the stacked gradients come from ``jnp.stack`` inside the same
  jitted step, XLA folds each slice back to the task's own gradient, so the stacked
  array is never materialised and each sum is one fused, vectorised reduction (the
  dot form forced the copy and ran a degenerate 2 x n x 2 matmul, about 15x slower on
  CPU).
  """
  leaves = jax.tree_util.tree_leaves(stacked)
  if not leaves:
    raise ValueError("gram_matrix: empty pytree")
  num_tasks = leaves[0].shape[0]
  dtype = _compute_dtype(leaves)
  entries = [[jnp.zeros((), dtype) for _ in range(num_tasks)] for _ in range(num_tasks)]
  for leaf in leaves:
    x = [leaf[t].astype(dtype) for t in range(num_tasks)]
    for t in range(num_tasks):
      for s in range(t, num_tasks):
        entries[t][s] = entries[t][s] + jnp.sum(x[t] * x[s])
  return jnp.stack([jnp.stack([entries[min(t, s)][max(t, s)] for s in range(num_tasks)])
                    for t in range(num_tasks)])


def weighted_task_sum(stacked: Any, weights: jax.Array) -> Any:
  """``sum_t weights[t] * leaf[t]`` per leaf, in at least float32, cast back to the leaf dtype."""
  def one(leaf):
    dtype = jnp.promote_types(leaf.dtype, weights.dtype)
    return _wsum(leaf.astype(dtype), weights.astype(dtype)).astype(leaf.dtype)
  return jax.tree_util.tree_map(one, stacked)


def all_diagnostics(opt_state: Any) -> list[SurgeryDiagnostics]:
  """The diagnostics of every surgery state in ``opt_state``, in tree order.

  More than one when the surgery runs per parameter group, e.g. AGS on the shared
  encoder and ``sum_tasks`` on task-specific heads inside ``optax.multi_transform``.
  """
  found = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_state)
  return [item.diagnostics for item in found if _is_state(item)]


def diagnostics(opt_state: Any) -> SurgeryDiagnostics:
  """The diagnostics of the (first) surgery state found in ``opt_state``.

  Works on a bare ``SurgeryState``, an ``optax.chain`` state (a tuple) and states
  nested in other wrappers; raises ValueError when there is none.
  """
  found = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_state)
  for item in found:
    if _is_state(item):
      return item.diagnostics
  raise ValueError("no SurgeryState in this optimizer state; is a surgery transform in the chain?")


# ----------------------------------------------------------------------------- internals

def _compute_dtype(leaves) -> jnp.dtype:
  return jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves])


def _wsum(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted sum over axis 0 as elementwise ops (fuses into reductions; no TF32)."""
  out = weights[0] * x[0]
  for t in range(1, x.shape[0]):
    out = out + weights[t] * x[t]
  return out


def _quad(gram: jax.Array, w: jax.Array) -> jax.Array:
  """``max(w^T G w, 0)``, elementwise."""
  return jnp.maximum(jnp.sum(w[:, None] * gram * w[None, :]), 0.0)


def _cosine(gram: jax.Array) -> jax.Array:
  sq = jnp.maximum(jnp.diagonal(gram), 0.0)
  denom = jnp.sqrt(sq)[:, None] * jnp.sqrt(sq)[None, :]
  ok = denom > 0
  cos = jnp.where(ok, jnp.clip(gram / jnp.where(ok, denom, 1.0), -1.0, 1.0), 0.0)
  eye = jnp.eye(gram.shape[0], dtype=bool)
  return jnp.where(eye, (sq > 0).astype(gram.dtype)[:, None], cos)  # exact 1 (or 0)


def _empty_diagnostics(num_tasks: int) -> SurgeryDiagnostics:
  f = jnp.float32
  return SurgeryDiagnostics(
      cosine=jnp.zeros((num_tasks, num_tasks), f), projected=jnp.zeros((), bool),
      degenerate=jnp.zeros((), bool), norm_tasks=jnp.zeros((num_tasks,), f),
      norm_sum=jnp.zeros((), f), norm_surgered=jnp.zeros((), f), norm_out=jnp.zeros((), f))


def _check_task_axis(updates: Any, num_tasks: int, name: str) -> list:
  with_path, _ = jax.tree_util.tree_flatten_with_path(updates)
  if not with_path:
    raise ValueError(f"{name}: the update pytree has no leaves")
  for path, leaf in with_path:
    shape = getattr(leaf, "shape", None)
    if shape is None or len(shape) < 1 or shape[0] != num_tasks:
      raise ValueError(
          f"{name}: update leaf {jax.tree_util.keystr(path)} has shape {shape}; every "
          f"leaf needs a leading task axis of size num_tasks={num_tasks} (stacked "
          f"per-task gradients); build the transform with num_tasks=T for T tasks")
  return [leaf for _, leaf in with_path]


