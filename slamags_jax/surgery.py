"""Multi-task gradient combination as optax transforms: AGS, PCGrad, sum, mean.

Every transform here takes *stacked* per-task gradients (each leaf has a leading task
axis ``[T, ...]``) and returns one update pytree without that axis, so it goes first
in an ``optax.chain``; later transforms (weight decay, SGD) see params and updates
without the task axis. ``init(params)`` takes params without the task axis.

Adaptive Gradient Surgery (the rule of docs/reference, "Pretraining"), over the whole
pytree as one vector:

1. ``g'_i = g_i``; for each task i, for each other task j (random order, below):
   if ``<g'_i, g_j> < 0``: ``g'_i -= <g'_i, g_j> / (||g_j||^2 + eps) * g_j``
   (projection against the *original* ``g_j``);
2. ``g = sum_i g'_i``;
3. ``g *= ||sum_i g_i|| / (||g|| + eps)`` (skipped when ``||g|| = 0``).

``pcgrad`` is steps 1-2 (no rescale); ``sum_tasks`` / ``mean_tasks`` are the plain
sum / mean (WeakSupCon, and with T = 1 the single-task methods).

How it is computed (Gram space). Each ``g'_i`` stays a linear combination of the
original gradients, ``g'_i = sum_k A[i, k] g_k``, and ``<g'_i, g_j> = (A G)[i, j]``
with ``G[t, s] = <g_t, g_s>``. So: one pass over the leaves builds the T x T Gram
matrix (float32 or wider, ``Precision.HIGHEST``; with sharded leaves the contraction
is global, XLA inserts the all-reduce); a T x T loop gives the weights
``w = 1^T A``; one weighted sum over the task axis per leaf gives the update. No
per-pair copies of the gradients are ever made.

AGS reads the gradients once more, for ``||g||`` and ``||sum_i g_i||`` measured on the
vectors themselves (two reductions, no copies kept): from the Gram matrix,
``w^T G w`` cancels catastrophically exactly where it matters (float32 error about
1e-7 * sum_i ||g_i||^2 in the *squared* norm, i.e. ``||g||`` is only resolved down to
about 3e-4 * sqrt(sum_i ||g_i||^2)), which would make the degenerate-case threshold
below unresolvable and the rescale factor wrong for small ``||g||``.

Random order. ``g'_i`` depends only on the order of the j it is projected against
(the order of i is irrelevant), so each task i gets its own random permutation of the
other tasks, as PCGrad's code shuffles the task list for every i. The order comes from
a PRNG key kept in the state: each update splits it, ``key, sub = split(key)``, and
uses ``projection_order(sub, T)``; deterministic for a seed. With T = 2 there is only
one other task and the key has no effect.

Degenerate cases (this project's definitions; docs/reference, "Where this project
differs on purpose"):

- A zero task gradient: nothing is projected against it (``<g'_i, 0> = 0`` is not
  negative) and it is not projected; ``eps`` keeps every division finite.
- All gradients zero: the update is exactly zero; no NaN in update or diagnostics.
- ``g1`` close to ``-lambda * g2`` (antiparallel; any lambda > 0): in exact arithmetic
  the surgered ``g`` vanishes, so in floating point it is rounding noise, and the
  authors' rescale would blow that noise up to the full norm ``||g1 + g2||`` in a
  random direction. Rule (AGS only): when
  ``||g||^2 <= rtol^2 * sum_i ||g_i||^2`` the update is the plain sum
  ``sum_i g_i`` instead (a meaningful direction, and its norm is the rescale target
  anyway). ``rtol`` defaults to 1e-5, about 100 float32 roundings; a real conflict
  above that (e.g. ``g2 = -g1 + delta`` with ``||delta|| = 1e-3 ||g1||``) is still
  handled by the exact rule. ``rtol=0`` gives the authors' behaviour.
  ``diagnostics(...).degenerate`` reports when the fallback ran. PCGrad has no
  rescale, so it returns the tiny vector as is.
- The plain sum vanishes but ``g`` does not (T > 2): the rescale makes the update
  (near) zero, as the authors' rule does.

Notes: ``eps`` is absolute, as in the reference (1e-10), so for gradients with
``||g_j||^2`` near 1e-10 the projection is incomplete, as in the authors' code.
Leaves keep their dtype; bf16 leaves are upcast for the dot products and sums.

Diagnostics (cosines, projection flag, norms) live in the state, with fixed shapes
(``num_tasks`` is fixed when the transform is built), for logging:
``surgery.diagnostics(opt_state)`` finds them inside a chain state.

Example (two losses -> stacked gradients -> chain):

>>> import jax, jax.numpy as jnp, optax
>>> from slamags_jax import surgery
>>> params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
>>> def task_losses(p):  # two tasks that disagree about w
...   loss1 = jnp.sum((p["w"] - 1.0) ** 2) + p["b"] ** 2
...   loss2 = jnp.sum((p["w"] + 2.0) ** 2) + (p["b"] - 1.0) ** 2
...   return jnp.stack([loss1, loss2])
>>> grads = jax.jacrev(task_losses)(params)  # every leaf gets a leading [2] axis
>>> grads["w"].shape
(2, 3)
>>> tx = optax.chain(
...     surgery.adaptive_gradient_surgery(),
...     optax.add_decayed_weights(1e-4),
...     optax.sgd(1e-3, momentum=0.9))
>>> opt_state = tx.init(params)
>>> updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
>>> params = optax.apply_updates(params, updates)
>>> params["w"].shape
(3,)
>>> diag = surgery.diagnostics(opt_state)
>>> bool(diag.projected), bool(diag.cosine[0, 1] < 0)
(True, True)
>>> bool(jnp.allclose(diag.norm_out, diag.norm_sum))
True

(With separate forward passes per task, stack the per-task gradient pytrees instead:
``jax.tree.map(lambda *g: jnp.stack(g), g1, g2)``.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "SurgeryDiagnostics",
    "SurgeryState",
    "adaptive_gradient_surgery",
    "all_diagnostics",
    "balance_task_norms",
    "diagnostics",
    "gram_matrix",
    "mean_tasks",
    "pcgrad",
    "projection_order",
    "projection_weights",
    "sum_tasks",
    "weighted_task_sum",
]


class SurgeryDiagnostics(NamedTuple):
  """What one update did, for logging (float32 / bool, fixed shapes).

  Norms marked (Gram) come from the Gram matrix: exact up to float32 cancellation,
  about 1e-7 * sum_i ||g_i||^2 in the squared norm; AGS measures its norms directly.
  """
  cosine: jax.Array  # [T, T] cosine between task gradients; 0 where one is zero
  projected: jax.Array  # bool []: some g'_i was projected (a conflict was found)
  degenerate: jax.Array  # bool []: AGS fell back to the plain sum (module docs)
  norm_tasks: jax.Array  # [T] ||g_i||
  norm_sum: jax.Array  # [] ||sum_i g_i|| (Gram, except AGS)
  norm_surgered: jax.Array  # [] norm of the combination before any rescale (Gram, except AGS)
  norm_out: jax.Array  # [] norm of the returned update (Gram, except AGS)


class SurgeryState(NamedTuple):
  """State of every transform here: the order key and the last diagnostics."""
  key: jax.Array  # uint32 raw key data (checkpoint-friendly); wrap_key_data to use
  diagnostics: SurgeryDiagnostics


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


def weighted_task_sum(stacked: Any, weights: jax.Array) -> Any:
  """``sum_t weights[t] * leaf[t]`` per leaf, in at least float32, cast back to the leaf dtype."""
  def one(leaf):
    dtype = jnp.promote_types(leaf.dtype, weights.dtype)
    return _wsum(leaf.astype(dtype), weights.astype(dtype)).astype(leaf.dtype)
  return jax.tree_util.tree_map(one, stacked)


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
  """PCGrad: the AGS projection and sum, no rescale, no degenerate fallback."""
  return _transform("pcgrad", num_tasks, seed, eps, 0.0)


def sum_tasks(num_tasks: int = 2) -> optax.GradientTransformation:
  """Plain sum over the task axis (WeakSupCon; T = 1 for single-task methods)."""
  return _transform("sum", num_tasks, 0, 0.0, 0.0)


def mean_tasks(num_tasks: int = 2) -> optax.GradientTransformation:
  """Plain mean over the task axis."""
  return _transform("mean", num_tasks, 0, 0.0, 0.0)


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


def all_diagnostics(opt_state: Any) -> list[SurgeryDiagnostics]:
  """The diagnostics of every surgery state in ``opt_state``, in tree order.

  More than one when the surgery runs per parameter group, e.g. AGS on the shared
  encoder and ``sum_tasks`` on task-specific heads inside ``optax.multi_transform``.
  """
  found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, SurgeryState))
  return [item.diagnostics for item in found if isinstance(item, SurgeryState)]


def diagnostics(opt_state: Any) -> SurgeryDiagnostics:
  """The diagnostics of the (first) surgery state found in ``opt_state``.

  Works on a bare ``SurgeryState``, an ``optax.chain`` state (a tuple) and states
  nested in other wrappers; raises ValueError when there is none.
  """
  found = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SurgeryState))
  for item in found:
    if isinstance(item, SurgeryState):
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


def _transform(method: str, num_tasks: int, seed: int, eps: float, rtol: float
               ) -> optax.GradientTransformation:
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
