"""The MIL loss, optimizer and the jitted training step and forward pass (data-parallel with a mesh)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slamags_jax.mil.batching import Params
from slamags_jax.runtime import parallel


def bag_loss(model: nn.Module, params: Params, batch: dict[str, Any], cluster_weight: float,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean over bags of cross-entropy + cluster_weight * (clustering losses).

  Bags of weight 0 (padding slots) do not count. ``dropout_key=None``: deterministic.
  """
  deterministic = dropout_key is None
  rngs = None if deterministic else {"dropout": dropout_key}
  out = model.apply({"params": params}, batch["x"], batch["mask"], deterministic=deterministic,
                    rngs=rngs)
  ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["y"])
  aux = out["aux"]["cluster"] + out["aux"]["proto_cluster"]
  w = batch["w"]
  wsum = jnp.maximum(w.sum(), 1.0)
  loss = jnp.sum(w * (ce + cluster_weight * aux)) / wsum
  parts = {"ce": jnp.sum(w * ce) / wsum,
           "cluster": jnp.sum(w * out["aux"]["cluster"]) / wsum,
           "proto_cluster": jnp.sum(w * out["aux"]["proto_cluster"]) / wsum}
  return loss, parts


def make_optimizer(mil_cfg: Any) -> optax.GradientTransformation:
  """Adam at ``mil.lr``; AdamW (decoupled decay) when ``mil.weight_decay`` > 0."""
  return _optimizer(float(mil_cfg.lr), float(mil_cfg.weight_decay))


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
  if weight_decay > 0:
    return optax.adamw(lr, weight_decay=weight_decay)
  return optax.adam(lr)


def step_layout(bags_per_step: int, num_devices: int) -> tuple[int, bool]:
  """(bag slots per step, whether the bag axis is sharded) for ``num_devices`` devices.

  At least as many bags as devices: shard, padding with empty bags to a multiple of the
  device count. Fewer: replicate (padding would mostly compute empty bags).
  """
  if num_devices > 1 and bags_per_step >= num_devices:
    return -(-bags_per_step // num_devices) * num_devices, True
  return bags_per_step, False


@functools.lru_cache(maxsize=8)
def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cluster_weight: float,
                    mesh: jax.sharding.Mesh | None = None, shard: bool = False) -> Callable[..., Any]:
  """Jitted (params, opt_state, batch, key, step) -> (params, opt_state, loss, parts).

  The dropout key of a step is ``fold_in(key, step)``. With ``mesh``: parameters,
  optimizer state and key replicated, the batch split along its bag axis when ``shard``
  (else replicated). Cached per (model, optimizer, weight, mesh, shard): repeated fits
  reuse the compiled step.
  """
  def step(params, opt_state, batch, key, index):
    drop_key = jax.random.fold_in(key, index)
    (loss, parts), grads = jax.value_and_grad(
        lambda p: bag_loss(model, p, batch, cluster_weight, drop_key), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts
  if mesh is None:
    return jax.jit(step)
  rep_ = parallel.replicated(mesh)
  data = parallel.batch_sharding(mesh) if shard else rep_
  return jax.jit(step, in_shardings=(rep_, rep_, data, rep_, rep_), out_shardings=rep_)


@functools.lru_cache(maxsize=8)
def make_forward(model: nn.Module, mesh: jax.sharding.Mesh | None = None) -> Callable[..., Any]:
  """Jitted deterministic (params, x, mask) -> (class probs [B, C], logits, attention, branches).

  ``branches`` [B, N, A] holds every attention branch (ABMIL: A = 1, the ranking one;
  PAMIL: A = 2, per class), kept for diagnostics. With ``mesh`` the bag axis is split
  over its devices (B a multiple of the device count) and the parameters replicated.
  """
  def forward(params, x, mask):
    out = model.apply({"params": params}, x, mask, deterministic=True)
    probs = jax.nn.softmax(out["logits"], axis=-1)
    return probs, out["logits"], out["attention"], out["attention_branches"]
  if mesh is None:
    return jax.jit(forward)
  data = parallel.batch_sharding(mesh)
  return jax.jit(forward, in_shardings=(parallel.replicated(mesh), data, data), out_shardings=data)
