"""The ``mil`` stage: train, select on validation bags, score every split, write ``<workdir>/mil``."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from slamags_jax import metrics
from slamags_jax.mil.batching import bucket_length
from slamags_jax.mil.inference import predict, split_metrics, with_temperature
from slamags_jax.mil.io import (
  SPLITS,
  _model_meta,
  _write_predictions,
  embedded_labels,
  load_embedded_bags,
  prepare_inputs,
  save_checkpoints,
  standardization,
)
from slamags_jax.mil.steps import make_forward, make_optimizer
from slamags_jax.mil.train import Interrupted, train_mil
from slamags_jax.models.mil import (
  ABNORMAL,
  init_model,
  make_model,
)
from slamags_jax.runtime import checkpoints, fileio, parallel, preemption
from slamags_jax.runtime.errors import UserError
from slamags_jax.runtime.metric_writer import MetricWriter

MIL_KEY_SALT = 0x4D494C  # folds cfg.seed into a MIL-specific key ("MIL")


RESUME_FILE = "resume"  # the orbax snapshot of the training state a preempted MIL stage saved


def _fingerprint(cfg: Any, workdir: str, length: int) -> str:
  """What a resume snapshot must have been made from: the MIL settings, the seed and the embeddings."""
  import hashlib
  h = hashlib.sha256()
  with open(os.path.join(workdir, "embeddings", "index.json"), "rb") as f:
    h.update(f.read())
  h.update(fileio.to_json({"mil": cfg.mil.to_dict(), "seed": cfg.seed, "length": length}).encode())
  return h.hexdigest()


def _load_resume(path: str, fingerprint: str, mil_cfg: Any, dim: int) -> tuple[Any, dict[str, Any]] | None:
  """The snapshot of a preempted attempt, when there is one that fits this run; else None (with a warning)."""
  if not os.path.exists(path):
    return None
  model, tx = make_model(mil_cfg), make_optimizer(mil_cfg)
  p0 = jax.eval_shape(lambda k: init_model(model, k, dim), jax.random.PRNGKey(0))
  like = {"params": p0, "opt_state": jax.eval_shape(tx.init, p0), "best_params": p0}
  try:
    trees, progress = checkpoints.load_snapshot(path, like)
  except Exception as e:  # a damaged or foreign file: MIL is cheap to redo
    logging.warning("MIL: the resume snapshot %s does not load (%s: %s); training afresh", path, type(e).__name__, e)
    return None
  if progress.get("fingerprint") != fingerprint:
    logging.warning("MIL: the resume snapshot %s was made from other settings or embeddings; training afresh", path)
    return None
  logging.info("MIL: resuming from step %d (epoch %d) of a preempted attempt", progress["global_step"],
               progress["epoch"])
  return trees, progress


def run(cfg: Any, workdir: str) -> None:
  """The ``mil`` stage: train, select on val, score every split, write ``<workdir>/mil``.

  SIGTERM / SIGINT during training: the state after the current step goes to
  ``mil/resume/`` (orbax) and the stage stops (exit 143 / 130); the rerun continues from it
  to the same outputs as an uninterrupted run, then deletes it.
  """
  t_start = time.perf_counter()
  out = os.path.join(workdir, "mil")
  writer = parallel.is_writer()  # every process trains (sharded steps); process 0 writes
  mesh = parallel.data_mesh()
  os.makedirs(out, exist_ok=True)
  for stale in ("summary.json", "metrics.jsonl"):  # this attempt starts afresh (or from mil/resume)
    p = os.path.join(out, stale)
    if writer and os.path.exists(p):
      os.unlink(p)
  bags = load_embedded_bags(workdir)
  by_split = {s: [b for b in bags if b["split"] == s] for s in SPLITS}
  train, val, test = by_split["train"], by_split["val"], by_split["test"]
  labels = embedded_labels(workdir)
  num_classes = len(labels)
  _check_training_bags(train, labels)
  dim = int(train[0]["embeddings"].shape[1])
  meta = _model_meta(cfg.mil, dim, labels)
  if cfg.mil.standardize:
    shift, scale = standardization(train)
    meta.update(input_mean=shift.tolist(), input_std=scale.tolist())
  bags = prepare_inputs(bags, meta)
  by_split = {s: [b for b in bags if b["split"] == s] for s in SPLITS}
  train, val, test = by_split["train"], by_split["val"], by_split["test"]
  length = bucket_length(max(b["embeddings"].shape[0] for b in bags))
  logging.info("MIL: %s on %d train / %d val / %d test bags, dim %d, padded length %d",
               cfg.mil.model, len(train), len(val), len(test), dim, length)

  metric_writer = MetricWriter(os.path.join(out, "metrics.jsonl"), enabled=writer, tensorboard=cfg.tensorboard)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), MIL_KEY_SALT)

  def log_epoch(record: dict[str, Any]) -> None:
    metric_writer.write(metrics.json_safe(record))

  resume_path = os.path.join(out, RESUME_FILE)
  fingerprint = _fingerprint(cfg, workdir, length)
  resume = _load_resume(resume_path, fingerprint, cfg.mil, dim)
  if resume is not None and writer:
    for record in resume[1]["history"]:  # the epochs logged before the preemption
      log_epoch(record)
  guard = preemption.Guard().install()  # SIGTERM / SIGINT: finish the step, save it, stop (exit 143 / 130)
  try:
    fit = train_mil(train, val, cfg.mil, key, length=length, progress=writer, on_epoch=log_epoch, mesh=mesh,
                    num_classes=num_classes, stop=guard.reached, resume=resume)
  except Interrupted as e:
    # every process calls it (orbax synchronises them; process 0 writes)
    checkpoints.save_snapshot(resume_path, e.trees, {**e.progress, "fingerprint": fingerprint})
    parallel.sync("mil: resume snapshot written")
    stop = guard.stop(f"finished MIL step {e.progress['global_step']} (epoch {e.progress['epoch']}) and saved "
                      f"the training state in {resume_path}")
    logging.warning("%s", stop)
    raise stop from None
  finally:
    guard.restore()
    metric_writer.close()
  if writer and os.path.exists(resume_path):
    shutil.rmtree(resume_path)  # training is complete: a rerun of this stage starts afresh
  logging.info("MIL: selected epoch %d (%s)", fit.best_epoch, fit.selection)
  model = make_model(cfg.mil, num_classes)
  forward = make_forward(model, mesh)
  if cfg.mil.temperature_scaling:  # opt-in calibration on the validation bags (never test)
    meta["temperature"] = _fit_temperature(model, fit.params, val, length, forward, mesh)
  ckpt_steps = save_checkpoints(os.path.join(out, "checkpoints"), fit, meta)
  predict(model, fit.params, test[:1] or train[:1], length, None, forward, mesh)  # compile outside timing
  t0 = time.perf_counter()
  test_pred = predict(model, fit.params, test, length, None, forward, mesh)
  infer_s = time.perf_counter() - t0
  preds = {"train": predict(model, fit.params, train, length, None, forward, mesh),
           "val": predict(model, fit.params, val, length, None, forward, mesh), "test": test_pred}
  if meta.get("temperature"):
    preds = {s: with_temperature(p, meta["temperature"]) for s, p in preds.items()}
    test_pred = preds["test"]
  ordered = train + val + test
  merged = {k: np.concatenate([preds[s][k] for s in SPLITS]) for k in ("prob", "pred", "probs", "logits")}
  for k in ("attention", "attention_branches"):
    merged[k] = [a for s in SPLITS for a in preds[s][k]]
  if writer:
    _write_predictions(out, ordered, merged, labels)

  summary = _summary(cfg, fit, meta, by_split, labels, length, test, test_pred, ckpt_steps, infer_s, t_start)
  if writer:
    fileio.write_json(os.path.join(out, "summary.json"), metrics.json_safe(summary))
  parallel.sync("mil: outputs written")  # the report stage reads what process 0 wrote
  logging.info("MIL done: best epoch %d, val %s, test %s", fit.best_epoch, summary["val_at_best"],
               summary["test"])


def _fit_temperature(model: Any, params: Any, val: list[dict[str, Any]], length: int, forward: Any,
                     mesh: Any) -> float:
  """T minimising the validation bags' cross-entropy of softmax(logits / T)."""
  from slamags_jax.report import uncertainty
  if not val:
    raise UserError("mil.temperature_scaling needs validation bags (bags.val_fraction > 0)")
  p = predict(model, params, val, length, None, forward, mesh)
  t = uncertainty.fit_temperature(p["logits"], [b["label"] for b in val])
  logging.info("MIL: temperature %.3f fitted on %d validation bags (NLL %.4f -> %.4f)", t, len(val),
               uncertainty.nll(p["logits"], [b["label"] for b in val]),
               uncertainty.nll(p["logits"], [b["label"] for b in val], t))
  return t


def _check_training_bags(train: list[dict[str, Any]], labels: list[str]) -> None:
  """MIL needs training bags of every class."""
  if not train:
    raise UserError("no training bags in embeddings/index.json")
  if len({b["label"] for b in train}) < 2:
    raise UserError("the training bags hold one class only; MIL needs negative and positive bags")
  absent = [labels[c] for c in range(len(labels)) if not any(b["label"] == c for b in train)]
  if absent:
    raise UserError(f"no training bag has the label(s) {', '.join(map(repr, absent))}; the MIL cannot learn them")


def _summary(cfg: Any, fit: Any, meta: dict[str, Any], by_split: dict[str, list[dict[str, Any]]],
             labels: list[str], length: int, test: list[dict[str, Any]], test_pred: dict[str, Any],
             ckpt_steps: list[int], infer_s: float, t_start: float) -> dict[str, Any]:
  """``mil/summary.json``: the settings, the selection, validation at the selected epoch, test, timings."""
  num_classes, val = len(labels), by_split["val"]
  best_rec = next((r for r in fit.history if r["epoch"] == fit.best_epoch), {})
  summary = {
      "model": cfg.mil.model,
      **{f"model_{k}": v for k, v in meta.items() if k not in ("model", "input_mean", "input_std")},
      "seed": cfg.seed, "epochs": int(cfg.mil.epochs), "bags_per_step": int(cfg.mil.bags_per_step),
      "lr": float(cfg.mil.lr), "padded_length": length,
      "n_bags": {s: len(by_split[s]) for s in SPLITS},
      "n_pos_bags": {s: int(sum(b["label"] == ABNORMAL for b in by_split[s])) for s in SPLITS},
      "labels": labels,
      "n_bags_per_label": {s: [int(sum(b["label"] == c for b in by_split[s])) for c in range(num_classes)]
                           for s in SPLITS},
      "best_epoch": fit.best_epoch, "selection": fit.selection, "temperature": meta.get("temperature"),
      "no_validation": not val, "standardized": bool(cfg.mil.standardize),
      "val_at_best": {k[4:]: best_rec.get(k) for k in ("val_loss", "val_auc", "val_accuracy", "val_f1")},
      "train_loss_at_best": best_rec.get("train_loss"),
      "final_train_loss": fit.history[-1]["train_loss"],
      "test": split_metrics(test, test_pred),
      "checkpoint_steps": ckpt_steps,
      "train_wall_s": fit.train_s,
      "train_bags_per_s": fit.steady_bags_per_s(),
      "train_bags_per_s_note": "after the first epoch (which includes the compilation)",
      "infer_bags_per_s": len(test) / infer_s if test and infer_s > 0 else None,
      "wall_s": time.perf_counter() - t_start,
  }
  return summary
