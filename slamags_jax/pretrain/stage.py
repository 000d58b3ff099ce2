"""The ``pretrain`` stage: the training loop with checkpoints, resume, logging and the probe."""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from slamags_jax import models
from slamags_jax.data import device_augment
from slamags_jax.models import conv
from slamags_jax.pretrain.methods import METHODS
from slamags_jax.pretrain.monitor import (
  _collapse_fields,
  _probe_cells,
  collapse_message,
  collapse_verdict,
  effective_rank,
  ntxent_chance,
  probe_stats,
)
from slamags_jax.pretrain.optim import (
  lr_schedule,
  make_optimizer,
  similarity_temperature,
)
from slamags_jax.pretrain.step import (
  augmented_train_step,
  create_train_state,
  param_l2,
  train_step,
)


def _truncate_metrics(path: str, last_step: int) -> list[dict]:
  """Drops metric lines after ``last_step`` (logged before a kill); returns the rest."""
  from slamags_jax.runtime import fileio
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

  from slamags_jax import bags as bags_lib
  from slamags_jax.models import embedding
  from slamags_jax.data import input_pipeline
  from slamags_jax.interop import torchvision as torchvision_io
  from slamags_jax.runtime import checkpoints, fileio, parallel, preemption
  from slamags_jax.runtime.errors import UserError
  from slamags_jax.runtime.progress import progress

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
  probe_fns = {w: embedding.make_embed_fn(model, cfg, mesh, which=w) for w in ("head", "pooled")}

  def probe(variables) -> dict:
    if probe_images is None or len(probe_images) < 2:
      return {}
    z = {w: embedding.embed_array(fn, variables, probe_images, mesh, cfg.embed.batch_size)
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
