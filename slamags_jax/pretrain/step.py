"""The pure pretraining step: per-task losses and gradients, surgery, update (one jitted function)."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamags_jax import losses, models, surgery
from slamags_jax.data import device_augment
from slamags_jax.pretrain.methods import Method


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32, steps taken (skipped non-finite steps included)
  params: Any
  batch_stats: Any
  opt_state: Any
  bad_streak: jax.Array  # int32, consecutive skipped (non-finite) steps
  bad_total: jax.Array  # int32, all skipped steps


def init_variables(model: models.SlamModel, key: jax.Array, crop: int) -> dict:
  """Parameters and BatchNorm statistics (shapes do not depend on views or devices)."""
  plain = model.clone(views=1, device_groups=1)
  return plain.init(key, jnp.zeros((2, crop, crop, 3), jnp.float32), train=True)


def create_train_state(model, tx, key, crop: int) -> TrainState:
  variables = init_variables(model, key, crop)
  params = variables["params"]
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
  return TrainState(step=zero(), params=params, batch_stats=variables["batch_stats"],
                    opt_state=tx.init(params), bad_streak=zero(), bad_total=zero())


def _forward_views(model, params, stats, images, mean, std):
  """uint8 [B, V, h, w, 3] -> outputs [B, V, ...] and updated BatchNorm statistics."""
  b, v = images.shape[:2]
  x = models.normalize(images.reshape((b * v,) + images.shape[2:]), mean, std, model.dtype)
  out, upd = model.clone(views=v).apply({"params": params, "batch_stats": stats}, x, train=True,
                                        mutable=["batch_stats"])
  return jax.tree_util.tree_map(lambda a: a.reshape((b, v) + a.shape[1:]), out), upd["batch_stats"]


def task_loss(task: str, model, params, stats, batch, *, mean, std, temperature, sim_temperature=None):
  """One task's loss and the BatchNorm statistics after its forward pass.

  The similarity task reads its own head when the model has one (``head_similarity``,
  ``model.task_heads=per_task``) and uses ``sim_temperature`` (default: ``temperature``).
  """
  if task == "ntxent":
    out, stats = _forward_views(model, params, stats, batch["pos"], mean, std)
    return losses.nt_xent(out["head"][:, 0], out["head"][:, 1], temperature), stats
  if task == "similarity":
    out, stats = _forward_views(model, params, stats, batch["neg"], mean, std)
    head = out.get("head_similarity", out["head"])
    return losses.similarity_loss(head, temperature if sim_temperature is None else sim_temperature), stats
  both = jnp.concatenate([batch["pos"], batch["neg"]], axis=0)
  out, stats = _forward_views(model, params, stats, both, mean, std)
  if task == "ntxent_all":
    return losses.nt_xent(out["head"][:, 0], out["head"][:, 1], temperature), stats
  if task == "ce":
    n_pos, n_neg = batch["pos"].shape[0], batch["neg"].shape[0]
    labels = jnp.concatenate([jnp.ones((n_pos,), jnp.int32), jnp.zeros((n_neg,), jnp.int32)])
    labels = jnp.repeat(labels[:, None], out["logits"].shape[1], axis=1)
    return losses.bag_label_cross_entropy(out["logits"].reshape(-1, 2), labels.reshape(-1)), stats
  raise ValueError(f"unknown task {task!r}")


def task_gradients(params, batch_stats, batch, *, model, method: Method, mean, std, temperature,
                   sim_temperature=None):
  """Each task's loss and gradient (through its own views only), and the new BN statistics.

  Tasks run in the method's order, threading the BatchNorm running statistics through
  them (positive views first, as the reference's forward passes).
  """
  stats = batch_stats
  task_losses, grads = [], []
  for task in method.tasks:
    fn = functools.partial(task_loss, task, model, mean=mean, std=std, temperature=temperature,
                           sim_temperature=sim_temperature)
    (loss, stats), g = jax.value_and_grad(fn, has_aux=True)(params, stats, batch)
    task_losses.append(loss)
    grads.append(g)
  return task_losses, grads, stats


def train_step(state: TrainState, batch: dict, *, model, tx, method: Method, mean, std,
               temperature: float, sim_temperature: float | None = None) -> tuple[TrainState, dict]:
  """One optimisation step: per-task gradients -> surgery -> weight decay -> SGD.

  A step whose loss or gradients are not finite changes nothing but the counters
  (`bad_streak`, `bad_total`); the loop stops the run after too many in a row.
  """
  task_losses, grads, stats = task_gradients(state.params, state.batch_stats, batch, model=model, method=method,
                                             mean=mean, std=std, temperature=temperature,
                                             sim_temperature=sim_temperature)
  stacked = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)
  # Each task's gradient norm over every parameter (before any balancing or surgery).
  task_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(surgery.gram_matrix(stacked)), 0.0))
  updates, opt_state = tx.update(stacked, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  total = sum(task_losses)
  diag = surgery.diagnostics(opt_state)
  # A NaN or inf anywhere in a task gradient makes its norm non-finite.
  ok = jnp.isfinite(total) & jnp.all(jnp.isfinite(task_norms))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  # On a skipped step the optimizer's float state (momentum) stays as it was, while its
  # integer state (the schedule's step count, the surgery's PRNG key) moves on with the
  # data, so skipped steps never shift the per-epoch learning-rate schedule.
  keep_floats = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
      lambda a, b: jnp.where(ok, a, b) if jnp.issubdtype(a.dtype, jnp.floating) else a, new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(stats, state.batch_stats),
      opt_state=keep_floats(opt_state, state.opt_state),
      bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
      bad_total=state.bad_total + jnp.where(ok, 0, 1))
  metrics = {"loss": total, "finite": ok}
  for i, (name, value) in enumerate(zip(method.tasks, task_losses)):
    metrics[f"loss/{name}"] = value
    metrics[f"grad_norm/{name}"] = task_norms[i]
  if len(method.tasks) > 1:
    t = len(method.tasks)
    off = ~jnp.eye(t, dtype=bool)
    metrics["surgery/cosine"] = jnp.sum(jnp.where(off, diag.cosine, 0.0)) / (t * (t - 1))
    metrics["surgery/projected"] = diag.projected.astype(jnp.float32)
  metrics["surgery/norm_sum"] = diag.norm_sum
  metrics["surgery/norm_out"] = diag.norm_out
  return new_state, metrics


def augmented_train_step(state: TrainState, batch: dict, *, seed: int, crop: int,
                         augment_spec: device_augment.AugmentSpec, neg_center_view: bool,
                         **step_kw) -> tuple[TrainState, dict]:
  """``train_step`` on an on-device input batch (``augment.on_device``): cells and their
  (step, row) in, the views cut first, in the same jitted program (``device_augment``)."""
  views = device_augment.augment_batch(batch, seed=seed, crop=crop, spec=augment_spec,
                                       neg_center_view=neg_center_view)
  return train_step(state, views, **step_kw)


def param_l2(params) -> float:
  """L2 norm over all trained parameters (float64 on the host)."""
  return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                             for x in jax.tree_util.tree_leaves(params))))
