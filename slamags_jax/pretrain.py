"""Stage `pretrain`: multitask pretraining of the encoder (SLAM-AGS and its baselines).

Pure functions first (what a step computes), then the stage (the loop, logging,
checkpoints). One step serves every method of the benchmark; a method is a set of
tasks plus the rule that combines their gradients:

| method       | tasks (loss on which views)                         | combine |
|--------------|-----------------------------------------------------|---------|
| `slam_ags`   | NT-Xent on positive patches, similarity on negative | AGS     |
| `weaksupcon` | same two tasks                                      | sum     |
| `pcgrad`     | same two tasks                                      | PCGrad  |
| `simclr`     | NT-Xent on all patches (bag labels unused)          | T = 1   |
| `weakly`     | cross-entropy of patches with their bag label       | T = 1   |
| `random`     | none: the randomly initialised encoder              | -       |
| `*_heads`    | the first three with one projection head per task   | as base |

Per-task gradients: each task's loss is differentiated with `jax.grad` through its own
views only, so the tasks together cost one backward pass over the batch. The stacked
task gradients go through the `surgery` transform, then coupled weight decay and SGD
with momentum (PyTorch's SGD semantics).

Views and BatchNorm: the reference makes four forward passes per step (positive views 1
and 2, negative views 1 and 2) so that BatchNorm statistics are per view batch; here
each task makes one forward call over its two views and `models.BatchNorm` keeps the
statistics per view batch (same normalisation, larger convolutions). Running
statistics are updated in the reference's order (positive, then negative views).

Views on the device (`augment.on_device`): the input batch holds the decoded cells and
their (step, row), and `augmented_train_step` cuts the views (`device_augment`) inside the
same jitted program, sharded with the batch; the default takes the numpy views.

Where this project differs from the reference on purpose: batches come from proper
shuffled epochs (`input_pipeline`), not a window sliding by one image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamags_jax import conv, device_augment, losses, models, surgery


@dataclasses.dataclass(frozen=True)
class Method:
  tasks: tuple[str, ...]  # task names, in the order of the stacked gradients
  combine: str  # "ags" | "pcgrad" | "sum"
  neg_center_view: bool  # negative view 0 is the plain centre crop (SLAM methods)


_TWO_TASKS = ("ntxent", "similarity")
METHODS = {
    "slam_ags": Method(_TWO_TASKS, "ags", True),
    "weaksupcon": Method(_TWO_TASKS, "sum", True),
    "pcgrad": Method(_TWO_TASKS, "pcgrad", True),
    "simclr": Method(("ntxent_all",), "sum", False),
    "weakly": Method(("ce",), "sum", False),
    "random": Method((), "sum", False),
    # The same three with one projection head per task on the shared encoder (the model
    # reads the `_heads` suffix: models.task_heads). results/collapse: the shared head
    # collapses under the similarity loss's pull; a head of its own lets that task be met
    # without flattening the contrastive head.
    "slam_ags_heads": Method(_TWO_TASKS, "ags", True),
    "weaksupcon_heads": Method(_TWO_TASKS, "sum", True),
    "pcgrad_heads": Method(_TWO_TASKS, "pcgrad", True),
}


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32, steps taken (skipped non-finite steps included)
  params: Any
  batch_stats: Any
  opt_state: Any
  bad_streak: jax.Array  # int32, consecutive skipped (non-finite) steps
  bad_total: jax.Array  # int32, all skipped steps


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


def combine_transform(method: Method, seed: int, aggregator: str = "method") -> optax.GradientTransformation:
  t = max(len(method.tasks), 1)
  if aggregator != "method":
    return AGGREGATORS[aggregator](t, seed)
  if method.combine == "ags":
    return surgery.adaptive_gradient_surgery(num_tasks=t, seed=seed)
  if method.combine == "pcgrad":
    return surgery.pcgrad(num_tasks=t, seed=seed)
  return surgery.sum_tasks(num_tasks=t)


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


def ntxent_chance(pairs: int) -> float:
  """NT-Xent's value when all 2B embeddings coincide: ln(2B - 1) (every logit equal)."""
  return math.log(2 * pairs - 1) if pairs >= 1 else float("nan")


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


# ----------------------------------------------------------------------------- the stage

# The collapse monitor warns below these (a healthy probe set has an effective rank of
# many dimensions and a spread near 1; a collapsed one, rank ~1 and spread ~0).
COLLAPSE_RANK = 2.0
COLLAPSE_SPREAD = 0.05


def effective_rank(embeddings: np.ndarray) -> float:
  """exp(entropy of the normalised singular values) (Roy & Vetterli 2007; RankMe).

  Between 1 (every embedding on one line: collapse) and min(n, D).
  """
  s = np.linalg.svd(np.asarray(embeddings, np.float64), compute_uv=False)
  if not np.any(s > 0):
    return 0.0
  p = s / np.sum(s)
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def embedding_spread(embeddings: np.ndarray) -> float:
  """Mean per-dimension std of the L2-normalised embeddings, times sqrt(D).

  About 1 for embeddings spread over the sphere, 0 when they all coincide (SimSiam's
  collapse indicator).
  """
  z = np.asarray(embeddings, np.float64)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.std(z, axis=0)) * math.sqrt(z.shape[1]))


def probe_stats(embeddings: np.ndarray, pooled: np.ndarray | None = None) -> dict[str, float]:
  """What the collapse monitor logs each epoch for the probe cells.

  ``effective_rank`` and ``spread`` are those of the embedded output (``model.embedding``);
  ``head_effective_rank`` and ``pooled_effective_rank`` those of the projection head and
  of the pooled encoder features, whatever is embedded (the head can collapse while the
  features below it do not).
  """
  out = {"effective_rank": effective_rank(embeddings), "spread": embedding_spread(embeddings)}
  if pooled is not None:
    out["pooled_effective_rank"] = effective_rank(pooled)
  return out


# A head is called collapsed when its contrastive loss sat within this share of its chance
# level over the last epoch, or the head's effective rank on the probe cells is below
# COLLAPSED_HEAD_RANK. Measured on PBC-ERB (probe of 256 cells, head 512): healthy heads
# have a rank of 20 to 100 (simclr about 70, the untrained encoder about 20); the
# collapsed two-task heads 2 to 5, with NT-Xent at 0.99-1.00 of ln(2B - 1).
COLLAPSED_CHANCE_SHARE = 0.98
COLLAPSED_HEAD_RANK = 8.0


def collapse_verdict(ntxent_last_epoch: float | None, chance: float | None, head_rank: float | None,
                     pooled_rank: float | None = None) -> dict[str, Any]:
  """``{"collapsed": bool, "reasons": [...], numbers...}`` for ``summary.json`` and the report."""
  reasons = []
  ratio = None
  if ntxent_last_epoch is not None and chance and math.isfinite(chance):
    ratio = float(ntxent_last_epoch) / chance
    if ratio >= COLLAPSED_CHANCE_SHARE:
      reasons.append(f"NT-Xent {ntxent_last_epoch:.3f} over the last epoch is {100 * ratio:.1f} % of its chance "
                     f"level ln(2B-1) = {chance:.3f} (threshold {100 * COLLAPSED_CHANCE_SHARE:.0f} %)")
  if head_rank is not None and head_rank < COLLAPSED_HEAD_RANK:
    reasons.append(f"head effective rank {head_rank:.2f} < {COLLAPSED_HEAD_RANK:g}")
  return {"collapsed": bool(reasons), "reasons": reasons, "ntxent_last_epoch": ntxent_last_epoch,
          "ntxent_chance": chance, "ntxent_over_chance": ratio, "head_effective_rank": head_rank,
          "pooled_effective_rank": pooled_rank, "chance_share_threshold": COLLAPSED_CHANCE_SHARE,
          "head_rank_threshold": COLLAPSED_HEAD_RANK}


def collapse_message(epoch: int, stats: dict) -> str | None:
  """The warning for collapsed probe embeddings (see COLLAPSE_*), or None when healthy."""
  if not stats or (stats["effective_rank"] >= COLLAPSE_RANK and stats["spread"] >= COLLAPSE_SPREAD):
    return None
  return (f"epoch {epoch}: embeddings of the probe cells look collapsed (effective rank "
          f"{stats['effective_rank']:.2f}, spread {stats['spread']:.3f}); check the learning rate and "
          "batch composition")


def _collapse_fields(verdict: dict) -> dict:
  """``collapsed`` at the top level of ``summary.json``, the numbers under ``collapse``."""
  return {"collapsed": verdict["collapsed"], "collapse": verdict}


def _probe_cells(manifest, cfg) -> np.ndarray:
  """A fixed set of training cells (from the data seed) for the collapse monitor."""
  from slamags_jax import bags as bags_lib, config as config_lib
  pos, neg = bags_lib.pretrain_pools(manifest)
  pool = np.union1d(pos, neg)
  n = min(cfg.pretrain.probe_cells, len(pool))
  rng = np.random.default_rng([config_lib.data_seed(cfg), 7])
  return np.sort(rng.choice(pool, size=n, replace=False)) if n else np.zeros((0,), np.int64)


def _truncate_metrics(path: str, last_step: int) -> list[dict]:
  """Drops metric lines after ``last_step`` (logged before a kill); returns the rest."""
  from slamags_jax import fileio
  kept = [r for r in fileio.read_jsonl(path) if r.get("step", 0) <= last_step]
  if os.path.exists(path):
    fileio.write_text(path, "".join(fileio.to_json_line(r) for r in kept))
  return kept


def run(cfg, workdir: str) -> None:
  """The `pretrain` stage (see module docstring); resumes from the newest checkpoint.

  Resume: the newest complete checkpoint gives the whole `TrainState` (restored into
  the shapes of `jax.eval_shape`, so no initialisation is computed) and the data
  iterator's position, and `metrics.jsonl` is cut back to its step: the run then ends
  with the same parameters as one that was never interrupted. The encoder and
  `summary.json` (the completion marker) are written last.
  """
  from absl import logging
  from slamags_jax.progress import progress
  from slamags_jax import (bags as bags_lib, checkpoints, embed, fileio, input_pipeline, parallel, preemption,
                           torchvision_io)
  from slamags_jax.errors import UserError

  out_dir = os.path.join(workdir, "pretrain")
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  os.makedirs(out_dir, exist_ok=True)
  manifest = bags_lib.load_manifest(workdir)
  method = METHODS[cfg.pretrain.method]
  mesh = parallel.data_mesh()
  writer = parallel.is_writer()
  model = models.from_config(cfg, device_groups=1 if cfg.model.bn_sync else mesh.size)
  crop = cfg.data.crop_size
  key = jax.random.key(cfg.seed)
  t_start = time.perf_counter()

  probe_ids = _probe_cells(manifest, cfg)
  probe_images = input_pipeline.center_crops(manifest, cfg, probe_ids) if len(probe_ids) else None
  probe_fns = {w: embed.make_embed_fn(model, cfg, mesh, which=w) for w in ("head", "pooled")}

  def probe(variables) -> dict:
    if probe_images is None or len(probe_images) < 2:
      return {}
    z = {w: embed.embed_array(fn, variables, probe_images, mesh, cfg.embed.batch_size)
         for w, fn in probe_fns.items()}
    out = probe_stats(z[cfg.model.embedding], z["pooled"])
    out["head_effective_rank"] = effective_rank(z["head"])
    return out

  def collapse_warning(epoch: int, stats: dict) -> None:
    message = collapse_message(epoch, stats)
    if message:
      logging.warning("%s", message)

  if not method.tasks:  # `random`: the initialised encoder is the result
    tx = make_optimizer(cfg, method, 1)
    state = torchvision_io.init_state_from(create_train_state(model, tx, key, crop), cfg.model.init_from)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    p = probe(parallel.replicate(variables, mesh))
    collapse_warning(0, p)
    checkpoints.save_encoder(os.path.join(out_dir, "encoder"), variables)
    if writer:
      fileio.write_json(os.path.join(out_dir, "summary.json"), {
          "method": cfg.pretrain.method, "steps": 0, "epochs": 0, "final_loss": None,
          "param_l2": param_l2(state.params), "wall_s": round(time.perf_counter() - t_start, 3),
          "final_effective_rank": p.get("effective_rank"), "final_spread": p.get("spread"),
          "final_head_effective_rank": p.get("head_effective_rank"),
          "final_pooled_effective_rank": p.get("pooled_effective_rank"),
          **_collapse_fields(collapse_verdict(None, None, p.get("head_effective_rank"),
                                              p.get("pooled_effective_rank"))),
          "conflict_fraction": None, "mean_task_cosine": None, "skipped_steps": 0})
    return

  n_dev = mesh.size
  data = input_pipeline.pretrain_data(manifest, cfg, seed=cfg.seed, neg_center_view=method.neg_center_view,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      multiple_of=n_dev)
  spe, num_steps = data.steps_per_epoch, data.num_steps
  contrastive = next((t for t in method.tasks if t in ("ntxent", "ntxent_all")), None)
  chance = {"ntxent": ntxent_chance(data.pos_per_step),
            "ntxent_all": ntxent_chance(data.pos_per_step + data.neg_per_step)}.get(contrastive)
  tx = make_optimizer(cfg, method, spe)
  schedule = lr_schedule(cfg.pretrain.lr, cfg.pretrain.epochs, cfg.pretrain.warmup_epochs, spe)
  init = functools.partial(create_train_state, model, tx, crop=crop)
  data_iter = data.iterator()
  mngr = checkpoints.manager(os.path.join(out_dir, "checkpoints"), cfg.pretrain.keep_checkpoints)
  start = mngr.latest_step() or 0
  wall_before = 0.0
  epoch_losses: list[float] = []
  if start > num_steps:
    mngr.close()
    raise UserError(f"the newest checkpoint in {mngr.directory} is at step {start}, beyond this run's {num_steps} "
                    f"steps: it was made with other settings; remove {out_dir} to start pretraining afresh")
  if start:
    replicated = parallel.replicated(mesh)
    like = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  jax.eval_shape(init, key))
    start, state = checkpoints.restore_newest(mngr, like, start_over=cfg.pretrain.start_over_if_damaged)
  if start:
    why = checkpoints.restore_data_iterator(mngr, start, data_iter)
    if why is not None:  # e.g. another data.workers: the pipeline can start at any step instead
      logging.warning("the data iterator state of step %d does not fit this pipeline (%s); starting the "
                      "pipeline at step %d instead (the same batches)", start, why, start)
      data_iter = data.iterator(start_step=start)
    logging.info("resumed pretraining from the checkpoint of step %d of %d", start, num_steps)
    kept = _truncate_metrics(metrics_path, start) if writer else []
    walls = [r["wall_s"] for r in kept if "wall_s" in r]
    wall_before = float(walls[-1]) if walls else 0.0
    epoch_losses.extend(r["loss"] for r in kept if r.get("kind") == "step" and not r.get("skipped")
                        and r["epoch"] == start // spe)
  else:
    state = parallel.replicate(torchvision_io.init_state_from(init(key), cfg.model.init_from), mesh)
    if writer and os.path.exists(metrics_path):
      os.unlink(metrics_path)  # a fresh start: metrics of an earlier, checkpoint-less attempt

  step_kw = dict(model=model, tx=tx, method=method, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                 temperature=cfg.pretrain.temperature, sim_temperature=similarity_temperature(cfg))
  if data.on_device:  # the views are cut on the device, sharded with the batch
    step_impl = functools.partial(augmented_train_step, seed=cfg.seed, crop=crop,
                                  augment_spec=device_augment.spec_from_config(cfg.augment),
                                  neg_center_view=method.neg_center_view, **step_kw)
  else:
    step_impl = functools.partial(train_step, **step_kw)
  step_fn = jax.jit(
      step_impl,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
      donate_argnums=0, compiler_options=conv.compiler_options())

  patches = cfg.pretrain.batch_size
  last = {"step": start, "loss": None, "t": time.perf_counter(), "bad_streak": int(state.bad_streak)}
  final_probe: dict = {}
  bar = progress(total=num_steps, initial=start, desc=f"pretrain {cfg.pretrain.method}", unit="step",
             disable=not writer)

  def handle(step: int, metrics: dict) -> None:
    """Host side of a finished step: log it, stop on a streak of non-finite steps."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    dt = max(now - last["t"], 1e-9) / max(step - last["step"], 1)
    last.update(step=step, t=now)
    finite = bool(m.pop("finite"))
    streak = last["bad_streak"] = 0 if finite else last["bad_streak"] + 1
    if finite:
      epoch_losses.append(m["loss"])
      last["loss"] = m["loss"]
    rec = {"kind": "step", "step": step, "epoch": (step - 1) // spe, "lr": float(schedule(step - 1)),
           "images_per_s": round(patches / dt, 2), "wall_s": round(wall_before + now - t_start, 3),
           "skipped": int(not finite), **{k: v for k, v in m.items()}}
    if contrastive is not None:
      rec[f"chance/{contrastive}"] = chance
    if writer and (step % cfg.pretrain.log_every_steps == 0 or not finite or step == num_steps):
      fileio.append_jsonl(metrics_path, rec)
    bar.update(1)
    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['images_per_s']:.1f}")
    if not finite:
      logging.warning("step %d: non-finite loss or gradients; update skipped (%d in a row)", step, streak)
    if streak >= cfg.pretrain.max_bad_steps:
      mngr.wait_until_finished()
      good = mngr.latest_step()  # checkpoints are only saved after a finite step
      kept = (f"the last good checkpoint is step {good} in {mngr.directory}" if good is not None
              else f"no checkpoint had been saved yet in {mngr.directory}")
      raise UserError(f"{streak} consecutive pretraining steps had non-finite loss or gradients (the last at "
                      f"step {step}; pretrain.max_bad_steps={cfg.pretrain.max_bad_steps}): stopped; {kept}. "
                      "Check the data, or lower pretrain.lr (with a new --workdir)")

  guard = preemption.Guard().install()  # SIGTERM / SIGINT: finish the step, save it, stop (exit 143 / 130)
  try:
    pending, saved = None, start
    for step in range(start + 1, num_steps + 1):
      batch = parallel.global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        handle(*pending)  # the previous step's metrics: the host never waits on the current step
      pending = (step, metrics)
      epoch_end = step % spe == 0
      if step % cfg.pretrain.checkpoint_every_steps == 0 or epoch_end or step == num_steps:
        handle(*pending)
        pending = None
        if epoch_end:
          variables = {"params": state.params, "batch_stats": state.batch_stats}
          final_probe = probe(variables)
          collapse_warning(step // spe, final_probe)
          rec = {"kind": "epoch", "epoch": step // spe - 1, "step": step,
                 "loss": float(np.mean(epoch_losses)) if epoch_losses else None, **final_probe}
          logging.info("epoch %d/%d: loss %s, effective rank %s", step // spe, cfg.pretrain.epochs,
                       rec["loss"], final_probe.get("effective_rank"))
          if writer:
            fileio.append_jsonl(metrics_path, rec)
          epoch_losses.clear()
        if last["bad_streak"] == 0 and (step % cfg.pretrain.checkpoint_every_steps == 0 or step == num_steps):
          checkpoints.save(mngr, step, state, data_iter, force=True)
          saved = step
      if guard.reached(step):
        if pending is not None:
          handle(*pending)
        if saved != step:
          checkpoints.save(mngr, step, state, data_iter, force=True)
        mngr.wait_until_finished()
        stop = guard.stop(f"finished step {step} of {num_steps} and saved its checkpoint in {mngr.directory}")
        logging.warning("%s", stop)
        raise stop
    if pending is not None:
      handle(*pending)
  finally:
    guard.restore()
    bar.close()
    mngr.close()  # waits for the last asynchronous save

  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  checkpoints.save_encoder(os.path.join(out_dir, "encoder"), variables)
  if not final_probe:
    final_probe = probe(parallel.replicate(variables, mesh))
  if writer:
    steps = [r for r in fileio.read_jsonl(metrics_path) if r.get("kind") == "step" and not r.get("skipped")]
    cos = [r["surgery/cosine"] for r in steps if "surgery/cosine" in r]
    last_epoch = [r[f"loss/{contrastive}"] for r in steps
                  if contrastive and r["epoch"] == (num_steps - 1) // spe and f"loss/{contrastive}" in r]
    verdict = collapse_verdict(float(np.mean(last_epoch)) if last_epoch else None, chance,
                               final_probe.get("head_effective_rank"), final_probe.get("pooled_effective_rank"))
    if verdict["collapsed"]:
      logging.warning("pretraining ended collapsed: %s (see pretrain/summary.json, 'collapse')",
                      "; ".join(verdict["reasons"]))
    fileio.write_json(os.path.join(out_dir, "summary.json"), {
        "method": cfg.pretrain.method, "steps": int(state.step), "epochs": cfg.pretrain.epochs,
        "steps_per_epoch": spe, "pos_per_step": data.pos_per_step, "neg_per_step": data.neg_per_step,
        "final_loss": steps[-1]["loss"] if steps else None, "param_l2": param_l2(state.params),
        "wall_s": round(wall_before + time.perf_counter() - t_start, 3),
        "final_effective_rank": final_probe.get("effective_rank"), "final_spread": final_probe.get("spread"),
        "final_head_effective_rank": final_probe.get("head_effective_rank"),
        "final_pooled_effective_rank": final_probe.get("pooled_effective_rank"),
        **_collapse_fields(verdict),
        "conflict_fraction": float(np.mean([c < 0 for c in cos])) if cos else None,
        "mean_task_cosine": float(np.mean(cos)) if cos else None,
        "skipped_steps": int(state.bad_total), "devices": n_dev})
