"""Scoring bags with a trained MIL model: probabilities, predictions, attention, bag metrics."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from slamags_jax import metrics
from slamags_jax.mil.batching import (
  Bag,
  Params,
  bucket_length,
  eval_batch_size,
  pad_batch,
  tier_length,
)
from slamags_jax.mil.steps import make_forward
from slamags_jax.models.mil import (
  ABNORMAL,
)
from slamags_jax.runtime import parallel


def predict(model: nn.Module, params: Params, bags: Sequence[Bag], length: int | None = None,
            batch_size: int | None = None, forward: Callable[..., Any] | None = None,
            mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Scores bags: class probabilities, prediction, logits, attention, CE.

  ``probs`` [n, C]; ``prob`` is p(class 1) (abnormal) for two classes, else the called
  class's probability; ``pred`` is p(abnormal) >= 0.5 for two classes, else the most
  probable class. ``attention`` is a list of float32 arrays, one per bag, of its real
  cells only: the ranking attention (two classes: abnormal-class attention; more: the
  called class's branch where the model has one per class); ``attention_branches`` the
  same for every branch [n, A]. ``ce`` is each bag's cross-entropy against its
  ``label`` (NaN where a bag has none). Bags are scored in batches of similar size
  (``tier_length`` up to ``length``, default: the largest bag's ``bucket_length``).
  With ``mesh`` each batch (rounded up to a multiple of the device count, padded with
  empty bags) is split over the devices; every process gets every bag's scores.
  """
  num_classes = int(model.num_classes)
  if not bags:
    return {"prob": np.zeros(0, np.float64), "pred": np.zeros(0, np.int64),
            "probs": np.zeros((0, num_classes), np.float64),
            "logits": np.zeros((0, num_classes), np.float32), "attention": [],
            "attention_branches": [], "ce": np.zeros(0, np.float64)}
  dim = bags[0]["embeddings"].shape[1]
  sizes = np.asarray([b["embeddings"].shape[0] for b in bags], np.int64)
  length = length or bucket_length(int(sizes.max()))
  forward = forward or make_forward(model, mesh)
  if mesh is not None:
    params = parallel.replicate(params, mesh)
  tiers = np.asarray([tier_length(int(n), length) for n in sizes])
  results: list[Any] = [None] * len(bags)
  for tier in sorted(set(tiers.tolist())):
    members = np.flatnonzero(tiers == tier)
    bs = batch_size or eval_batch_size(tier, dim)
    if mesh is not None:
      bs = -(-bs // mesh.size) * mesh.size
    for start in range(0, len(members), bs):
      idx = members[start:start + bs]
      chunk = [bags[i] for i in idx]
      batch = pad_batch(chunk, tier, bs, dim)
      if mesh is None:
        p, lg, a, br = jax.device_get(forward(params, batch["x"], batch["mask"]))
      else:
        xm = parallel.shard_rows((batch["x"], batch["mask"]), mesh)
        p, lg, a, br = (parallel.to_host(o) for o in forward(params, *xm))
      for j, i in enumerate(idx):
        n = int(sizes[i])
        results[i] = (np.asarray(p[j], np.float64), np.asarray(lg[j], np.float32),
                      np.asarray(a[j, :n], np.float32), np.asarray(br[j, :n], np.float32))
  probs = np.stack([r[0] for r in results])
  logits = np.stack([r[1] for r in results])
  branches = [r[3] for r in results]
  if num_classes == 2:
    prob = probs[:, ABNORMAL]
    pred = (prob >= metrics.THRESHOLD).astype(np.int64)
    attn = [r[2] for r in results]
  else:
    pred = probs.argmax(-1).astype(np.int64)
    prob = probs[np.arange(len(bags)), pred]
    attn = [br[:, c] if br.shape[1] == num_classes else r[2] for br, c, r in zip(branches, pred, results)]
  labels = [b.get("label") for b in bags]
  logp = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
  ce = np.asarray([-logp[i, int(y)] if y is not None else np.nan for i, y in enumerate(labels)])
  return {"prob": prob, "pred": pred, "probs": probs, "logits": logits,
          "attention": attn, "attention_branches": branches, "ce": ce}


def split_metrics(bags: Sequence[Bag], pred: dict[str, Any]) -> dict[str, float]:
  """Bag-level loss, AUC, accuracy and F1 of ``predict`` output for labelled bags.

  Two classes: abnormal-class AUC and F1. More: macro one-vs-rest AUC (over the classes
  where it is defined) and macro F1 (``metrics.class_metrics``).
  """
  if not bags:
    nan = float("nan")
    return {"loss": nan, "auc": nan, "accuracy": nan, "f1": nan}
  num_classes = pred["probs"].shape[1]
  if num_classes > 2:
    m = metrics.class_metrics([b["label"] for b in bags], pred["probs"], num_classes)
    return {"loss": float(np.mean(pred["ce"])), "auc": m["macro_auc"], "accuracy": m["accuracy"],
            "f1": m["macro_f1"]}
  m = metrics.bag_metrics([b["label"] for b in bags], pred["prob"])
  return {"loss": float(np.mean(pred["ce"])), "auc": m["auc"], "accuracy": m["accuracy"],
          "f1": m["f1"]}


def with_temperature(pred: dict[str, Any], temperature: float) -> dict[str, Any]:
  """``predict``'s output with class probabilities softmax(logits / temperature) (``mil.temperature_scaling``).

  A positive temperature keeps every call (the argmax, and for two classes the 0.5
  threshold) and every attention; ``ce`` is left as the unscaled model's loss.
  """
  t = float(temperature)
  z = np.asarray(pred["logits"], np.float64) / t
  probs = np.exp(z - np.logaddexp.reduce(z, axis=-1, keepdims=True))
  out = dict(pred)
  out["probs"] = probs
  out["prob"] = probs[:, ABNORMAL] if probs.shape[1] == 2 else probs[np.arange(len(probs)), pred["pred"]]
  return out
