"""The pretraining methods' combine transforms (the registry itself: ``slamags_jax.methods``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from slamags_jax import methods, surgery
from slamags_jax.methods import METHODS, Method  # noqa: F401  (the registry, re-exported)

# pretrain.aggregator -> transform(num_tasks, seed); "method" keeps the method's own combine.
AGGREGATORS: dict[str, Callable[[int, int], optax.GradientTransformation]] = {
    "ags": lambda t, seed: surgery.adaptive_gradient_surgery(num_tasks=t, seed=seed),
    "pcgrad": lambda t, seed: surgery.pcgrad(num_tasks=t, seed=seed),
    "sum": lambda t, seed: surgery.sum_tasks(num_tasks=t),
    "mean": lambda t, seed: surgery.mean_tasks(num_tasks=t),
    "upgrad": lambda t, seed: surgery.upgrad(t),
    "dualproj": lambda t, seed: surgery.dualproj(t),
    "mgda": lambda t, seed: surgery.mgda(t),
    "cagrad": lambda t, seed: surgery.cagrad(t, 0.5),
    "imtl_g": lambda t, seed: surgery.imtl_g(t),
    "aligned_mtl": lambda t, seed: surgery.aligned_mtl(t),
    "con_fig": lambda t, seed: surgery.con_fig(t),
    "nash_mtl": lambda t, seed: surgery.nash_mtl(t),
    "gradvac": lambda t, seed: surgery.gradvac(t, seed=seed),
    "graddrop": lambda t, seed: surgery.graddrop(t, seed=seed),
    "fairgrad": lambda t, seed: surgery.fairgrad(t, 1.0),
    "excess_mtl": lambda t, seed: surgery.excess_mtl(t),
    "random_weights": lambda t, seed: surgery.random_weights(t, seed=seed),
}
assert set(AGGREGATORS) | {"method"} == set(methods.AGGREGATORS), "slamags_jax.methods.AGGREGATORS is out of date"


def combine_transform(method: Method, seed: int, aggregator: str = "method") -> optax.GradientTransformation:
  """The method's own gradient combination, or the ``pretrain.aggregator`` transform instead."""
  t = max(len(method.tasks), 1)
  if aggregator != "method":
    return AGGREGATORS[aggregator](t, seed)
  if method.combine == "ags":
    return surgery.adaptive_gradient_surgery(num_tasks=t, seed=seed)
  if method.combine == "pcgrad":
    return surgery.pcgrad(num_tasks=t, seed=seed)
  return surgery.sum_tasks(num_tasks=t)


def shared_label(params) -> Any:
  """``"shared"`` for the encoder's parameters, ``"task"`` for the heads (surgery_scope=shared)."""
  return {name: jax.tree_util.tree_map(lambda _: "shared" if name == "encoder" else "task", sub)
          for name, sub in params.items()}


def combine_for_config(cfg, method: Method) -> optax.GradientTransformation:
  """The stacked-gradient part of the optimizer: [balance ->] combine, over all or shared params.

  Defaults are the authors' rule (the combine over every parameter as one vector). With
  ``pretrain.surgery_scope=shared`` the combine sees only the encoder and the heads get
  the plain sum of the task gradients (with per-task heads each head's gradient comes
  from its own task only, the other's is zero there), as LibMTL applies its weighting
  to the shared parameters only.
  """
  t = max(len(method.tasks), 1)
  combine = combine_transform(method, cfg.seed, cfg.pretrain.get("aggregator", "method"))
  if cfg.pretrain.surgery_scope == "shared" and t > 1:
    combine = optax.multi_transform({"shared": combine, "task": surgery.sum_tasks(num_tasks=t)}, shared_label)
  if cfg.pretrain.balance_task_norms and t > 1:
    combine = optax.chain(surgery.balance_task_norms(num_tasks=t), combine)
  return combine
