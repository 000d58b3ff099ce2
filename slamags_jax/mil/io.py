"""MIL inputs and outputs: embedded bags, input standardisation, orbax checkpoints, prediction files."""

from __future__ import annotations

import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from slamags_jax.mil.batching import Bag, Params
from slamags_jax.mil.train import FitResult
from slamags_jax.runtime import fileio, parallel
from slamags_jax.runtime.errors import UserError

SPLITS = ("train", "val", "test")


def standardization(train: Sequence[Bag], floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std over the cells of the training bags (``mil.standardize``).

  Why: embeddings differ in scale and offset between methods (a head output of a
  nearly collapsed encoder varies by 1e-3 around a common direction); standardising
  with training statistics lets the same MIL settings read every method's embeddings.
  Dimensions with no spread keep scale 1 (``floor``).
  """
  x = np.concatenate([b["embeddings"] for b in train]).astype(np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  std = np.where(std > floor * max(float(np.max(std)), 1e-30), std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def prepare_inputs(bags: Sequence[Bag], meta: dict[str, Any]) -> list[Bag]:
  """Applies the checkpoint's input standardisation (if any) to raw embedded bags."""
  if meta.get("input_mean") is None:
    return list(bags)
  shift = np.asarray(meta["input_mean"], np.float32)
  scale = np.asarray(meta["input_std"], np.float32)
  return [{**b, "embeddings": (b["embeddings"] - shift) / scale} for b in bags]


def load_embedded_bags(workdir: str) -> list[Bag]:
  """Bags of ``<workdir>/embeddings``: dicts id, split, label, k, embeddings, cell_ids."""
  folder = os.path.join(workdir, "embeddings")
  index_path = os.path.join(folder, "index.json")
  if not os.path.exists(index_path):
    raise UserError(f"{index_path} not found: run the embed stage first")
  index = fileio.read_json(index_path)
  dim = int(index["dim"])
  bags = []
  for entry in index["bags"]:
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path):
      raise UserError(f"embedding file {path} listed in {index_path} is missing: rerun the embed stage")
    with np.load(path) as z:
      emb = np.asarray(z["embeddings"], np.float32)
      cell_ids = np.asarray(z["cell_ids"], np.int64)
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] != cell_ids.shape[0] or emb.shape[0] == 0:
      raise UserError(f"{path}: embeddings {emb.shape} and cell_ids {cell_ids.shape} do not match "
                      f"dim {dim} of {index_path}")
    if "n" in entry and int(entry["n"]) != emb.shape[0]:
      raise UserError(f"{path}: {emb.shape[0]} cells but index.json says {entry['n']}")
    if not np.isfinite(emb).all():
      raise UserError(f"{path}: embeddings contain NaN or inf (the encoder diverged?)")
    if entry["split"] not in SPLITS:
      raise UserError(f"{index_path}: bag {entry['id']} has unknown split {entry['split']!r}")
    bags.append({"id": str(entry["id"]), "split": entry["split"], "label": int(entry["label"]),
                 "k": int(entry.get("k", 0)), "embeddings": emb, "cell_ids": cell_ids})
  return bags


def embedded_labels(workdir: str) -> list[str]:
  """Class names by index from ``embeddings/index.json`` (slides), else ["normal", "abnormal"]."""
  index = fileio.read_json(os.path.join(workdir, "embeddings", "index.json"))
  return list(index.get("labels") or ["normal", "abnormal"])


def _model_meta(mil_cfg: Any, input_dim: int, labels: Sequence[str] | None = None) -> dict[str, Any]:
  keys = ("model", "hidden_dim", "attention_dim", "n_prototypes", "dropout")
  names = list(labels) if labels else ["normal", "abnormal"]
  return {"input_dim": int(input_dim), "input_mean": None, "input_std": None, "num_classes": len(names),
          "labels": names, **{k: mil_cfg[k] for k in keys}}


def save_checkpoints(folder: str, fit: FitResult, meta: dict[str, Any]) -> list[int]:
  """Writes the selected and the last parameters with orbax (step = epoch)."""
  folder = os.path.abspath(folder)
  if parallel.is_writer() and os.path.exists(folder):
    shutil.rmtree(folder)  # a previous, unfinished attempt of this stage
  parallel.sync("mil: checkpoint folder cleared")  # every process saves (orbax: process 0 writes)
  last_epoch = fit.history[-1]["epoch"] if fit.history else 0
  entries = {fit.best_epoch: (fit.params, ["best"])}
  if last_epoch == fit.best_epoch:
    entries[last_epoch][1].append("last")
  else:
    entries[last_epoch] = (fit.last_params, ["last"])
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(folder, options=options, item_names=("params", "meta")) as mngr:
    for epoch in sorted(entries):
      params, roles = entries[epoch]
      mngr.save(epoch, args=ocp.args.Composite(
          params=ocp.args.StandardSave(jax.device_get(params)),
          meta=ocp.args.JsonSave({**meta, "epoch": epoch, "roles": roles})))
    mngr.wait_until_finished()
  return sorted(entries)


def load_checkpoint(workdir: str, which: str = "best") -> tuple[Params, dict[str, Any]]:
  """(params, meta) of the ``best`` or ``last`` MIL checkpoint; meta rebuilds the model.

  Feed it ``prepare_inputs(load_embedded_bags(workdir), meta)``: the meta holds the
  input standardisation the model was trained with.
  """
  folder = os.path.abspath(os.path.join(workdir, "mil", "checkpoints"))
  if not os.path.isdir(folder):
    raise UserError(f"{folder} not found: run the mil stage first")
  with ocp.CheckpointManager(folder, item_names=("params", "meta")) as mngr:
    for step in mngr.all_steps():
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if which in meta["roles"]:
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
        return params["params"], meta
  raise UserError(f"no {which!r} checkpoint in {folder}")


def _write_predictions(folder: str, bags: Sequence[Bag], pred: dict[str, Any], labels: Sequence[str]) -> None:
  n = np.asarray([b["embeddings"].shape[0] for b in bags], np.int64)
  offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
  fileio.save_npz(
      os.path.join(folder, "predictions.npz"),
      bag_ids=np.asarray([b["id"] for b in bags], dtype=str),
      split=np.asarray([b["split"] for b in bags], dtype=str),
      label=np.asarray([b["label"] for b in bags], np.int64),
      prob=np.asarray(pred["prob"], np.float64),
      probs=np.asarray(pred["probs"], np.float64),
      pred=np.asarray(pred["pred"], np.int64),
      logits=np.asarray(pred["logits"], np.float32),
      n_cells=n, offsets=offsets,
      cell_ids=np.concatenate([b["cell_ids"] for b in bags]).astype(np.int64),
      attention=np.concatenate(pred["attention"]).astype(np.float32),
      attention_branches=np.concatenate(pred["attention_branches"]).astype(np.float32))
  fileio.write_json(os.path.join(folder, "predictions.json"), {
      "format": "slamags-mil-predictions/1",
      "labels": list(labels),
      "probs": "class probabilities per bag, in the order of labels",
      "attention": ("ranking attention per cell, in the bag's cell order; sums to 1 per bag: the abnormal "
                    "class's for two classes, the called class's (PAMIL) for more"),
      "attention_branches": ("every attention branch per cell [cells, A]: ABMIL A = 1 (the ranking "
                             "branch), PAMIL A = number of classes (one per class, in label order)"),
      "bags": [{"id": b["id"], "split": b["split"], "label": b["label"], "n": int(n[i]),
                "prob": float(pred["prob"][i]), "pred": int(pred["pred"][i]),
                "probs": [float(x) for x in pred["probs"][i]]}
               for i, b in enumerate(bags)]})


def load_predictions(workdir: str) -> list[dict[str, Any]]:
  """Per bag: id, split, label, prob, probs [C], pred, cell_ids [n], attention [n], attention_branches."""
  path = os.path.join(workdir, "mil", "predictions.npz")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: run the mil stage first")
  with np.load(path) as z:
    d = {k: z[k] for k in z.files}
  out = []
  for i, bag_id in enumerate(d["bag_ids"]):
    lo, hi = int(d["offsets"][i]), int(d["offsets"][i + 1])
    out.append({"id": str(bag_id), "split": str(d["split"][i]), "label": int(d["label"][i]),
                "prob": float(d["prob"][i]), "pred": int(d["pred"][i]),
                "probs": d["probs"][i] if "probs" in d else np.asarray([1 - d["prob"][i], d["prob"][i]]),
                "cell_ids": d["cell_ids"][lo:hi], "attention": d["attention"][lo:hi],
                "attention_branches": d["attention_branches"][lo:hi]})
  return out
