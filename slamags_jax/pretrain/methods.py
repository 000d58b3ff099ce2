"""The pretraining methods' combine transforms (the registry itself: ``slamags_jax.methods``)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from slamags_jax import surgery
from slamags_jax.methods import METHODS, Method  # noqa: F401  (the registry, re-exported)


def combine_transform(method: Method, seed: int) -> optax.GradientTransformation:
  t = max(len(method.tasks), 1)
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
  combine = combine_transform(method, cfg.seed)
  if cfg.pretrain.surgery_scope == "shared" and t > 1:
    combine = optax.multi_transform({"shared": combine, "task": surgery.sum_tasks(num_tasks=t)}, shared_label)
  if cfg.pretrain.balance_task_norms and t > 1:
    combine = optax.chain(surgery.balance_task_norms(num_tasks=t), combine)
  return combine
