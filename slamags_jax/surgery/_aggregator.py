"""The one builder behind the TorchJD-style aggregators: checks, Gram matrix, state, diagnostics.

An aggregator is a function ``combine(updates, gram, extra, key) -> (out, w, extra)``:
``w`` is the task-weight vector when the method is a weighting of the task gradients
(then ``out`` is None and the builder forms ``sum_t w_t g_t`` per leaf), or None when
the method works coordinate by coordinate (then ``out`` is the update pytree).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from slamags_jax.surgery._core import (
  AggregatorState,
  SurgeryDiagnostics,
  _check_task_axis,
  _cosine,
  _empty_diagnostics,
  _quad,
  gram_matrix,
  weighted_task_sum,
)

Combine = Callable[[Any, jax.Array, Any, jax.Array], tuple[Any, Any, Any]]


def check_num_tasks(num_tasks: Any, name: str, minimum: int = 1) -> None:
  """Raises ValueError unless ``num_tasks`` is an int >= ``minimum``."""
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < minimum:
    raise ValueError(f"{name}: num_tasks must be an int >= {minimum}, got {num_tasks!r}")


def state_dtype(params: Any) -> jnp.dtype:
  """The float dtype of a method's state: float32, or wider when the params are."""
  return jnp.result_type(jnp.float32, *[jnp.result_type(p) for p in jax.tree_util.tree_leaves(params)])


def normalize_gram(gram: jax.Array, eps: float) -> jax.Array:
  """``G / trace(G)``, or zeros when ``trace(G) < eps`` (TorchJD's ``normalize``)."""
  tr = jnp.trace(gram)
  return jnp.where(tr < eps, jnp.zeros_like(gram), gram / jnp.where(tr < eps, 1.0, tr))


def aggregator(name: str, num_tasks: int, combine: Combine, *, seed: int = 0,
               init_extra: Callable[[Any], Any] = lambda params: (),
               needs_gram: bool = True, diagnostics: bool = True) -> optax.GradientTransformation:
  """An optax transform from ``combine`` (module docs); state is an ``AggregatorState``.

  ``init_extra(params)`` builds the method's own state (params without the task axis).
  The PRNG key is split on every update; ``combine`` gets the fresh subkey.
  ``diagnostics=False`` (only where ``needs_gram`` is False): no Gram pass at all,
  ``combine`` gets ``gram=None``, the diagnostics stay zero.
  """
  if diagnostics is False and needs_gram:
    raise ValueError(f"{name} needs the Gram matrix: diagnostics cannot be turned off")
  def init_fn(params):
    key = jax.random.key_data(jax.random.key(seed))
    return AggregatorState(key=key, diagnostics=_empty_diagnostics(num_tasks),
                           extra=init_extra(params))

  def update_fn(updates, state, params=None):
    del params
    _check_task_axis(updates, num_tasks, name)
    gram = gram_matrix(updates) if needs_gram else None
    new_key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    out, w, extra = combine(updates, gram, state.extra, sub)
    if not diagnostics:  # weighting methods only (checked above)
      if w is not None:
        out = weighted_task_sum(updates, w)
      return out, AggregatorState(key=jax.random.key_data(new_key), diagnostics=state.diagnostics,
                                  extra=extra)
    if gram is None:  # the diagnostics need it; cheap next to the coordinate-wise work
      gram = gram_matrix(updates)
    if w is not None:
      w = w.astype(gram.dtype)
      out = weighted_task_sum(updates, w)
      norm_out = jnp.sqrt(_quad(gram, w))
    else:
      norm_out = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(gram.dtype)))
                              for x in jax.tree_util.tree_leaves(out)))
    f = jnp.float32
    off = ~jnp.eye(num_tasks, dtype=bool)
    diag = SurgeryDiagnostics(
        cosine=_cosine(gram).astype(f), projected=jnp.any(off & (gram < 0)),
        degenerate=jnp.zeros((), bool),
        norm_tasks=jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)).astype(f),
        norm_sum=jnp.sqrt(_quad(gram, jnp.ones((num_tasks,), gram.dtype))).astype(f),
        norm_surgered=norm_out.astype(f), norm_out=norm_out.astype(f))
    return out, AggregatorState(key=jax.random.key_data(new_key), diagnostics=diag,
                                extra=extra)

  return optax.GradientTransformation(init_fn, update_fn)
