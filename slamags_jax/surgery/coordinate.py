"""Coordinate-wise aggregators: TrimmedMean, GradDrop, ExcessMTL.

These read every coordinate of every task gradient (no Gram-space shortcut exists):
TrimmedMean sorts each coordinate over the tasks, GradDrop draws a sign mask per
coordinate, ExcessMTL keeps an AdaGrad-like sum of squared gradients per task and
coordinate in the optax state (T times the parameter memory).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from slamags_jax.surgery._aggregator import aggregator, check_num_tasks, state_dtype


def trimmed_mean(num_tasks: int, trim_number: int) -> optax.GradientTransformation:
  """TrimmedMean: per coordinate, drops the ``trim_number`` largest and smallest values, averages the rest.

  A Byzantine-robust rule. Paper: Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates" (ICML 2018). TorchJD: ``TrimmedMean(trim_number)``;
  needs ``T >= 2 * trim_number + 1``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, -5.0], [2.0, 0.0], [30.0, 1.0]])}
  >>> tx = surgery.trimmed_mean(num_tasks=3, trim_number=1)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [2.0, 0.0]
  """
  name = "trimmed_mean"
  check_num_tasks(num_tasks, name)
  if trim_number < 0 or num_tasks < 2 * trim_number + 1:
    raise ValueError(f"{name}: needs 0 <= trim_number and num_tasks >= 2 * trim_number + 1; "
                     f"got num_tasks={num_tasks}, trim_number={trim_number}")

  def one(leaf):
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    kept = jnp.sort(leaf.astype(dtype), axis=0)[trim_number:num_tasks - trim_number]
    return jnp.mean(kept, axis=0).astype(leaf.dtype)

  def combine(updates, gram, extra, key):
    return jax.tree_util.tree_map(one, updates), None, extra
  return aggregator(name, num_tasks, combine, needs_gram=False)


def graddrop(num_tasks: int = 2, leak: Sequence[float] | None = None,
             seed: int = 0) -> optax.GradientTransformation:
  """GradDrop: per coordinate, keeps only the positive or only the negative task entries, at random.

  ``P = (1 + sum_i g_i / sum_i |g_i|) / 2``; with ``U ~ Uniform(0, 1)`` per coordinate,
  task i keeps its entry where ``P > U`` and it is positive, or ``P < U`` and it is
  negative; ``leak_i`` lets that fraction through regardless. One fresh ``U`` per step
  (key in the state). Paper: Chen et al., "Just Pick a Sign: Optimizing Deep Multitask
  Models with Gradient Sign Dropout" (NeurIPS 2020). TorchJD: ``GradDrop(leak=None)``
  (identity ``f``).

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
  >>> tx = surgery.graddrop(num_tasks=2)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> float(out["w"][0])  # both entries positive: P = 1, always kept
  4.0
  """
  name = "graddrop"
  check_num_tasks(num_tasks, name)
  lk = None if leak is None else tuple(float(x) for x in leak)
  if lk is not None and len(lk) != num_tasks:
    raise ValueError(f"{name}: leak has {len(lk)} entries; it needs num_tasks={num_tasks}")

  def combine(updates, gram, extra, key):
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves):
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)
      x = leaf.astype(dtype)
      abs_sum = jnp.sum(jnp.abs(x), axis=0)
      p = 0.5 * (1.0 + jnp.sum(x, axis=0) / jnp.where(abs_sum > 0, abs_sum, 1.0))
      u = jax.random.uniform(k, p.shape, dtype)
      keep = ((p > u) & (x > 0)) | ((p < u) & (x < 0))
      lv = jnp.zeros((num_tasks,), dtype) if lk is None else jnp.asarray(lk, dtype)
      lv = lv.reshape((num_tasks,) + (1,) * (x.ndim - 1))
      out.append(jnp.sum((lv + (1 - lv) * keep) * x, axis=0).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), None, extra
  return aggregator(name, num_tasks, combine, seed=seed)


class ExcessMTLExtra(NamedTuple):
  """ExcessMTL's memory (TorchJD's buffers)."""
  weights: jax.Array  # [T] current task weights
  sq_grad_sum: object  # pytree of [T, ...] sums of squared gradients
  initial_w: jax.Array  # [T] the first excess-risk estimate (after warm-up)
  has_initial: jax.Array  # bool []
  warmup_w_sum: jax.Array  # [T]
  steps: jax.Array  # int32 []


def excess_mtl(num_tasks: int = 2, robust_step_size: float = 1.0,
               n_warmup_steps: int = 0) -> optax.GradientTransformation:
  """ExcessMTL: task weights from each task's excess risk, estimated with AdaGrad statistics.

  Per task: ``w_i = sum_coords g_i^2 / sqrt(S_i + 1e-7)`` with ``S_i`` the running sum
  of ``g_i^2``; after ``n_warmup_steps`` (weights fixed at 1/T) ``w`` is divided by its
  first (or warm-up mean) value and the weights become
  ``softmax(log(weights) + robust_step_size * w)``. State: weights, S (T x params),
  counters. Paper: He et al., "Robust Multi-Task Learning with Excess Risks"
  (ICML 2024). TorchJD: ``ExcessMTL(robust_step_size=1.0, n_warmup_steps=0)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.excess_mtl(num_tasks=2)
  >>> out, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [0.269, 1.462]
  """
  name = "excess_mtl"
  check_num_tasks(num_tasks, name)
  if robust_step_size <= 0 or n_warmup_steps < 0:
    raise ValueError(f"{name}: needs robust_step_size > 0 and n_warmup_steps >= 0, got "
                     f"{robust_step_size}, {n_warmup_steps}")

  def init_extra(params):
    f = state_dtype(params)
    sq = jax.tree_util.tree_map(
        lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.promote_types(p.dtype, f)), params)
    return ExcessMTLExtra(weights=jnp.full((num_tasks,), 1.0 / num_tasks, f), sq_grad_sum=sq,
                          initial_w=jnp.zeros((num_tasks,), f), has_initial=jnp.zeros((), bool),
                          warmup_w_sum=jnp.zeros((num_tasks,), f), steps=jnp.zeros((), jnp.int32))

  def combine(updates, gram, extra, key):
    sq_sum = jax.tree_util.tree_map(lambda s, g: s + jnp.square(g.astype(s.dtype)),
                                    extra.sq_grad_sum, updates)
    w = sum(jnp.sum((jnp.square(g.astype(s.dtype)) / jnp.sqrt(s + 1e-7)).reshape(num_tasks, -1),
                    axis=1)
            for g, s in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(sq_sum)))
    w = w.astype(extra.weights.dtype)
    warming = extra.steps < n_warmup_steps
    warm_sum = jnp.where(warming, extra.warmup_w_sum + w, extra.warmup_w_sum)
    first = ~warming & ~extra.has_initial
    if n_warmup_steps > 0:
      init_w = jnp.where(first, warm_sum / n_warmup_steps, extra.initial_w)
      w_rel = w / (init_w + 1e-7)
    else:
      init_w = jnp.where(first, w, extra.initial_w)
      w_rel = jnp.where(first, w, w / (init_w + 1e-7))
    new_weights = jax.nn.softmax(jnp.log(extra.weights) + w_rel * robust_step_size)
    weights = jnp.where(warming, extra.weights, new_weights)
    new = ExcessMTLExtra(weights=weights, sq_grad_sum=sq_sum, initial_w=init_w,
                         has_initial=extra.has_initial | ~warming, warmup_w_sum=warm_sum,
                         steps=extra.steps + 1)
    return None, weights, new
  return aggregator(name, num_tasks, combine, init_extra=init_extra)
