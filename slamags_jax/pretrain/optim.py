"""The pretraining optimizer: per-epoch warm-up + cosine schedule, coupled weight decay, SGD with momentum."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from slamags_jax.pretrain.methods import Method, combine_for_config


def lr_schedule(peak: float, epochs: int, warmup_epochs: int, steps_per_epoch: int) -> Callable:
  """Linear warm-up over `warmup_epochs`, then cosine decay to 0 at `epochs`, stepped per epoch.

  As the reference, the learning rate changes once per epoch: in epoch e (0-based) it is
  peak * (e + 1) / warmup during warm-up, then peak * (1 + cos(pi * (e - W) / (E - W))) / 2.
  """
  spe = max(int(steps_per_epoch), 1)

  def schedule(count):
    e = jnp.asarray(count, jnp.float32) // spe
    warm = peak * (e + 1.0) / max(warmup_epochs, 1)
    span = max(epochs - warmup_epochs, 1)
    cos = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * jnp.clip(e - warmup_epochs, 0, span) / span))
    return jnp.where(e < warmup_epochs, warm, cos)
  return schedule


def make_optimizer(cfg, method: Method, steps_per_epoch: int) -> optax.GradientTransformation:
  p = cfg.pretrain
  return optax.chain(
      combine_for_config(cfg, method),
      optax.add_decayed_weights(p.weight_decay),
      optax.sgd(lr_schedule(p.lr, p.epochs, p.warmup_epochs, steps_per_epoch), momentum=p.momentum))


def similarity_temperature(cfg) -> float:
  """The similarity loss's temperature: its own when set, else NT-Xent's (the authors')."""
  t = float(cfg.pretrain.similarity_temperature)
  return float(cfg.pretrain.temperature) if t == -1 else t
