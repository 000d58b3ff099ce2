"""The ``pretrain`` stage: the loop (``runtime.loop.run_steps``) with its checkpoints, logging and probe.

Resume: the newest complete checkpoint gives the whole ``TrainState`` (restored into the
shapes of ``jax.eval_shape``, so no initialisation is computed) and the data iterator's
position, and ``metrics.jsonl`` is cut back to its step: the run then ends with the same
parameters as one that was never interrupted. The encoder and ``summary.json`` (the
completion marker) are written last.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from slamags_jax import bags as bags_lib
from slamags_jax import models
from slamags_jax.data import device_augment, input_pipeline
from slamags_jax.interop import torchvision as torchvision_io
from slamags_jax.models import conv, embedding
from slamags_jax.pretrain.methods import METHODS, Method
from slamags_jax.pretrain.monitor import (
  _collapse_fields,
  _probe_cells,
  collapse_message,
  collapse_verdict,
  effective_rank,
  ntxent_chance,
  probe_stats,
)
from slamags_jax.pretrain.optim import lr_schedule, make_optimizer, similarity_temperature
from slamags_jax.pretrain.step import augmented_train_step, create_train_state, param_l2, train_step
from slamags_jax.runtime import checkpoints, fileio, parallel, preemption
from slamags_jax.runtime.errors import UserError
from slamags_jax.runtime.loop import NonFiniteStreak, Schedule, run_steps
from slamags_jax.runtime.metric_writer import MetricWriter
from slamags_jax.runtime.progress import progress


def _truncate_metrics(path: str, last_step: int) -> list[dict]:
  """Drops metric lines after ``last_step`` (logged before a kill); returns the rest."""
  kept = [r for r in fileio.read_jsonl(path) if r.get("step", 0) <= last_step]
  if os.path.exists(path):
    fileio.write_text(path, "".join(fileio.to_json_line(r) for r in kept))
  return kept


class _Probe:
  """The collapse monitor's probe: fixed training cells embedded (head and pooled) after each epoch."""

  def __init__(self, cfg: Any, model: Any, mesh: Any, manifest: dict):
    ids = _probe_cells(manifest, cfg)
    self.images = input_pipeline.center_crops(manifest, cfg, ids) if len(ids) else None
    self.fns = {w: embedding.make_embed_fn(model, cfg, mesh, which=w) for w in ("head", "pooled")}
    self.cfg, self.mesh = cfg, mesh

  def __call__(self, variables: dict) -> dict:
    if self.images is None or len(self.images) < 2:
      return {}
    z = {w: embedding.embed_array(fn, variables, self.images, self.mesh, self.cfg.embed.batch_size)
         for w, fn in self.fns.items()}
    out = probe_stats(z[self.cfg.model.embedding], z["pooled"])
    out["head_effective_rank"] = effective_rank(z["head"])
    return out

  @staticmethod
  def warn(epoch: int, stats: dict) -> None:
    message = collapse_message(epoch, stats)
    if message:
      logging.warning("%s", message)


class _Checkpointer:
  """Saves the state with the data iterator's position; declines during a non-finite streak."""

  def __init__(self, mngr: Any, data_iter: Any, streak: NonFiniteStreak):
    self.mngr, self.data_iter, self.streak = mngr, data_iter, streak
    self.where = str(mngr.directory)

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    if self.streak.count and not force:
      return False
    checkpoints.save(self.mngr, step, state, self.data_iter, force=True)
    return True

  def wait(self) -> None:
    self.mngr.wait_until_finished()


class _Monitor:
  """The host side of the loop: a metrics line per step, the epoch line with the probe, the streak."""

  def __init__(self, cfg: Any, *, writer: MetricWriter, data: Any, contrastive: str | None, chance: float | None,
               probe: _Probe, mngr: Any, start: int, bad_streak: int, wall_before: float, epoch_losses: list[float]):
    self.cfg, self.writer, self.probe, self.mngr = cfg, writer, probe, mngr
    self.spe, self.num_steps = data.steps_per_epoch, data.num_steps
    self.contrastive, self.chance = contrastive, chance
    self.lr = lr_schedule(cfg.pretrain.lr, cfg.pretrain.epochs, cfg.pretrain.warmup_epochs, self.spe)
    self.streak = NonFiniteStreak(cfg.pretrain.max_bad_steps, bad_streak)
    self.last_step, self.last_t, self.t_start = start, time.perf_counter(), time.perf_counter()
    self.wall_before, self.epoch_losses, self.final_probe = wall_before, epoch_losses, {}
    self.bar = progress(total=self.num_steps, initial=start, desc=f"pretrain {cfg.pretrain.method}", unit="step",
                        disable=not writer.enabled)

  def wall(self) -> float:
    return self.wall_before + time.perf_counter() - self.t_start

  def on_metrics(self, step: int, metrics: Any) -> None:
    """Logs a finished step; stops on a streak of non-finite steps (``pretrain.max_bad_steps``)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    dt = max(now - self.last_t, 1e-9) / max(step - self.last_step, 1)
    self.last_step, self.last_t = step, now
    finite = bool(m.pop("finite"))
    streak = self.streak.update(finite)
    if finite:
      self.epoch_losses.append(m["loss"])
    rec = {"kind": "step", "step": step, "epoch": (step - 1) // self.spe, "lr": float(self.lr(step - 1)),
           "images_per_s": round(self.cfg.pretrain.batch_size / dt, 2), "wall_s": round(self.wall(), 3),
           "skipped": int(not finite), **m}
    if self.contrastive is not None:
      rec[f"chance/{self.contrastive}"] = self.chance
    if step % self.cfg.pretrain.log_every_steps == 0 or not finite or step == self.num_steps:
      self.writer.write(rec)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['images_per_s']:.1f}")
    if not finite:
      logging.warning("step %d: non-finite loss or gradients; update skipped (%d in a row)", step, streak)
    if self.streak.exceeded:
      self._stop_on_streak(step, streak)

  def _stop_on_streak(self, step: int, streak: int) -> None:
    self.mngr.wait_until_finished()
    good = self.mngr.latest_step()  # checkpoints are only saved after a finite step
    kept = (f"the last good checkpoint is step {good} in {self.mngr.directory}" if good is not None
            else f"no checkpoint had been saved yet in {self.mngr.directory}")
    raise UserError(f"{streak} consecutive pretraining steps had non-finite loss or gradients (the last at "
                    f"step {step}; pretrain.max_bad_steps={self.cfg.pretrain.max_bad_steps}): stopped; {kept}. "
                    "Check the data, or lower pretrain.lr (with a new --workdir)")

  def on_epoch_end(self, step: int, state: Any) -> None:
    """The probe of the epoch's encoder and the epoch line (mean loss of its finite steps)."""
    self.final_probe = self.probe({"params": state.params, "batch_stats": state.batch_stats})
    self.probe.warn(step // self.spe, self.final_probe)
    rec = {"kind": "epoch", "epoch": step // self.spe - 1, "step": step,
           "loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else None, **self.final_probe}
    logging.info("epoch %d/%d: loss %s, effective rank %s", step // self.spe, self.cfg.pretrain.epochs,
                 rec["loss"], self.final_probe.get("effective_rank"))
    self.writer.write(rec)
    self.epoch_losses.clear()


def run(cfg: Any, workdir: str) -> None:
  """The ``pretrain`` stage (see the package docstring); resumes from the newest checkpoint."""
  out_dir = os.path.join(workdir, "pretrain")
  os.makedirs(out_dir, exist_ok=True)
  manifest = bags_lib.load_manifest(workdir)
  method = METHODS[cfg.pretrain.method]
  mesh = parallel.data_mesh()
  model = models.from_config(cfg, device_groups=1 if cfg.model.bn_sync else mesh.size)
  probe = _Probe(cfg, model, mesh, manifest)
  if not method.tasks:  # `random`: the initialised encoder is the result
    _run_untrained(cfg, model, method, probe, out_dir, mesh)
  else:
    _pretrain(cfg, model, method, probe, out_dir, mesh, manifest)


def _run_untrained(cfg: Any, model: Any, method: Method, probe: _Probe, out_dir: str, mesh: Any) -> None:
  """Method ``random``: the initialised (or ``model.init_from``) encoder, probed and saved."""
  t_start = time.perf_counter()
  tx = make_optimizer(cfg, method, 1)
  state = torchvision_io.init_state_from(
      create_train_state(model, tx, jax.random.key(cfg.seed), cfg.data.crop_size), cfg.model.init_from)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  p = probe(parallel.replicate(variables, mesh))
  probe.warn(0, p)
  checkpoints.save_encoder(os.path.join(out_dir, "encoder"), variables)
  if parallel.is_writer():
    fileio.write_json(os.path.join(out_dir, "summary.json"), {
        "method": cfg.pretrain.method, "steps": 0, "epochs": 0, "final_loss": None,
        "param_l2": param_l2(state.params), "wall_s": round(time.perf_counter() - t_start, 3),
        **_probe_fields(p),
        **_collapse_fields(collapse_verdict(None, None, p.get("head_effective_rank"),
                                            p.get("pooled_effective_rank"))),
        "conflict_fraction": None, "mean_task_cosine": None, "skipped_steps": 0})


def _probe_fields(p: dict) -> dict:
  return {"final_effective_rank": p.get("effective_rank"), "final_spread": p.get("spread"),
          "final_head_effective_rank": p.get("head_effective_rank"),
          "final_pooled_effective_rank": p.get("pooled_effective_rank")}


def _jit_step(cfg: Any, model: Any, tx: Any, method: Method, mesh: Any, on_device: bool):
  """The jitted step (numpy views, or views cut on the device), its state donated."""
  step_kw = dict(model=model, tx=tx, method=method, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                 temperature=cfg.pretrain.temperature, sim_temperature=similarity_temperature(cfg))
  if on_device:  # the views are cut on the device, sharded with the batch
    step_impl = functools.partial(augmented_train_step, seed=cfg.seed, crop=cfg.data.crop_size,
                                  augment_spec=device_augment.spec_from_config(cfg.augment),
                                  neg_center_view=method.neg_center_view, **step_kw)
  else:
    step_impl = functools.partial(train_step, **step_kw)
  return jax.jit(step_impl, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0, compiler_options=conv.compiler_options())


def _restore_or_init(cfg: Any, mngr: Any, data: Any, init: Any, mesh: Any, writer: MetricWriter,
                     out_dir: str) -> tuple[int, Any, Any, float, list[float]]:
  """(start step, state, data iterator, wall seconds before, this epoch's logged losses)."""
  key = jax.random.key(cfg.seed)
  data_iter = data.iterator()
  start = mngr.latest_step() or 0
  if start > data.num_steps:
    mngr.close()
    raise UserError(f"the newest checkpoint in {mngr.directory} is at step {start}, beyond this run's "
                    f"{data.num_steps} steps: it was made with other settings; remove {out_dir} to start "
                    "pretraining afresh")
  if start:
    replicated = parallel.replicated(mesh)
    like = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  jax.eval_shape(init, key))
    start, state = checkpoints.restore_newest(mngr, like, start_over=cfg.pretrain.start_over_if_damaged)
  if not start:
    state = parallel.replicate(torchvision_io.init_state_from(init(key), cfg.model.init_from), mesh)
    writer.reset()  # a fresh start: metrics of an earlier, checkpoint-less attempt
    return 0, state, data_iter, 0.0, []
  why = checkpoints.restore_data_iterator(mngr, start, data_iter)
  if why is not None:  # e.g. another data.workers: the pipeline can start at any step instead
    logging.warning("the data iterator state of step %d does not fit this pipeline (%s); starting the "
                    "pipeline at step %d instead (the same batches)", start, why, start)
    data_iter = data.iterator(start_step=start)
  logging.info("resumed pretraining from the checkpoint of step %d of %d", start, data.num_steps)
  kept = _truncate_metrics(writer.path, start) if writer.enabled else []
  walls = [r["wall_s"] for r in kept if "wall_s" in r]
  losses = [r["loss"] for r in kept if r.get("kind") == "step" and not r.get("skipped")
            and r["epoch"] == start // data.steps_per_epoch]
  return start, state, data_iter, float(walls[-1]) if walls else 0.0, losses


def _pretrain(cfg: Any, model: Any, method: Method, probe: _Probe, out_dir: str, mesh: Any, manifest: dict) -> None:
  """Trains to ``data.num_steps`` (from the newest checkpoint), then saves the encoder and the summary."""
  data = input_pipeline.pretrain_data(manifest, cfg, seed=cfg.seed, neg_center_view=method.neg_center_view,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      multiple_of=mesh.size)
  contrastive = next((t for t in method.tasks if t in ("ntxent", "ntxent_all")), None)
  chance = {"ntxent": ntxent_chance(data.pos_per_step),
            "ntxent_all": ntxent_chance(data.pos_per_step + data.neg_per_step)}.get(contrastive)
  tx = make_optimizer(cfg, method, data.steps_per_epoch)
  init = functools.partial(create_train_state, model, tx, crop=cfg.data.crop_size)
  writer = MetricWriter(os.path.join(out_dir, "metrics.jsonl"), enabled=parallel.is_writer(),
                        tensorboard=cfg.tensorboard)
  mngr = checkpoints.manager(os.path.join(out_dir, "checkpoints"), cfg.pretrain.keep_checkpoints)
  start, state, data_iter, wall_before, epoch_losses = _restore_or_init(cfg, mngr, data, init, mesh, writer, out_dir)
  monitor = _Monitor(cfg, writer=writer, data=data, contrastive=contrastive, chance=chance, probe=probe, mngr=mngr,
                     start=start, bad_streak=int(state.bad_streak), wall_before=wall_before, epoch_losses=epoch_losses)
  guard = preemption.Guard().install()  # SIGTERM / SIGINT: finish the step, save it, stop (exit 143 / 130)
  schedule = Schedule(data.num_steps, data.steps_per_epoch, cfg.pretrain.checkpoint_every_steps)
  try:
    state = run_steps(
        state, start=start, schedule=schedule,
        step_fn=_jit_step(cfg, model, tx, method, mesh, data.on_device),
        next_batch=lambda: parallel.global_batch(next(data_iter), mesh), on_metrics=monitor.on_metrics,
        on_epoch_end=monitor.on_epoch_end, checkpointer=_Checkpointer(mngr, data_iter, monitor.streak), guard=guard)
  finally:
    guard.restore()
    monitor.bar.close()
    writer.close()
    mngr.close()  # waits for the last asynchronous save
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  checkpoints.save_encoder(os.path.join(out_dir, "encoder"), variables)
  final_probe = monitor.final_probe or probe(parallel.replicate(variables, mesh))
  if parallel.is_writer():
    _write_summary(cfg, out_dir, state, data, contrastive, chance, final_probe, monitor.wall(), mesh.size)


def _write_summary(cfg: Any, out_dir: str, state: Any, data: Any, contrastive: str | None, chance: float | None,
                   final_probe: dict, wall_s: float, n_dev: int) -> None:
  """``pretrain/summary.json`` (the completion marker), from the metrics file and the final probe."""
  spe, num_steps = data.steps_per_epoch, data.num_steps
  steps = [r for r in fileio.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
           if r.get("kind") == "step" and not r.get("skipped")]
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
      "wall_s": round(wall_s, 3), **_probe_fields(final_probe), **_collapse_fields(verdict),
      "conflict_fraction": float(np.mean([c < 0 for c in cos])) if cos else None,
      "mean_task_cosine": float(np.mean(cos)) if cos else None,
      "skipped_steps": int(state.bad_total), "devices": n_dev})
