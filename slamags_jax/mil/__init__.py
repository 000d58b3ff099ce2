"""Stage 2: attention-based multiple-instance learning (MIL) on frozen cell embeddings.

The aggregators (``mil.model``: ``abmil``, ``pamil``) are in ``mil_models`` (re-exported
here); this module pads bags, trains, selects, predicts and runs the stage.

Padding (the masking is in ``mil_models``: a bag alone and the same bag padded inside a
batch give the same logits, attention and gradients). Bags of one size are padded to one bucketed length (next multiple of 32 of the largest
bag), so every step and every evaluation batch has the same shape (one compilation
each). Bags of varying size (slides: a hundred to 10,000+ cells) are padded per step and
per evaluation batch to a power-of-two tier of 32 (``tier_length``) at most that length:
a few compiled shapes, and small bags do not pay for the largest.

Training: Adam (AdamW when ``mil.weight_decay`` > 0), ``mil.bags_per_step`` bags per
step (1 = the reference; a short last step is padded with empty, zero-weight bags),
shuffled each epoch with an explicit key, bag cross-entropy (+ clustering losses).
Data parallelism (``mesh``; ``run`` uses every device of every process): the bag axis
of a step is split over the devices when the step has at least as many bags as there
are devices (padded with empty, zero-weight bags up to a multiple of the device count),
otherwise the step is replicated (one bag per step, the reference's setting: each device
would otherwise compute mostly empty bags). Parameters and Adam state are replicated;
the weighted mean over bags is a global reduction under ``jax.jit``, so a step equals
the single-device step. Evaluation batches are split over the devices likewise.

MODEL SELECTION (a documented departure from the authors, who select on training
accuracy): after every epoch the validation bags are scored; the selected epoch has the
highest validation ROC-AUC, ties (within 1e-9) broken by the lower validation
cross-entropy, and the earlier epoch wins a full tie. An undefined AUC (one class among
the validation bags) ranks below any defined one, so then the loss decides. Without
validation bags the last epoch is used, and the log and summary say so.

Outputs of ``run`` under ``<workdir>/mil/``: ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (orbax; the selected ("best") and the last epoch, step = epoch,
written once training ends: the stage is short and reruns from scratch),
``predictions.npz`` + ``predictions.json`` (every bag: abnormal probability, class
probabilities ``probs``, prediction, per-cell ranking attention and every attention
branch; the class names in ``labels``) and, last, ``summary.json``.
The stage uses bag labels only; instance labels are read by the report stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from slamags_jax.runtime.progress import progress as progress_bar

from slamags_jax.runtime import fileio
from slamags_jax import metrics
from slamags_jax.runtime import parallel
from slamags_jax.runtime import preemption
from slamags_jax.runtime.errors import UserError
from slamags_jax.models.mil import (  # noqa: F401  (re-exported: mil.make_model etc. stay as they were)
    ABNORMAL, NUM_CLASSES, GatedABMIL, PrototypeGatedMIL, WeightNormDense, init_model, l2_normalize, make_model,
    masked_softmax, model_from_meta)

PAD_MULTIPLE = 32
MIL_KEY_SALT = 0x4D494C  # folds cfg.seed into a MIL-specific key ("MIL")
SPLITS = ("train", "val", "test")
_TIE_EPS = 1e-9
_EVAL_ELEMENTS = 1 << 23  # cap on B * N * D floats per evaluation batch

Params = Any
Bag = dict[str, Any]


# ----------------------------------------------------------------------------- batches


def bucket_length(n_max: int, multiple: int = PAD_MULTIPLE) -> int:
  """Padded bag length: ``n_max`` rounded up to a multiple of ``multiple`` (>= 1)."""
  return max(1, int(math.ceil(max(n_max, 1) / multiple)) * multiple)


def tier_length(n: int, cap: int, multiple: int = PAD_MULTIPLE) -> int:
  """Padded length of a batch whose largest bag has ``n`` cells: ``multiple`` x 2^j >= n, at most ``cap``.

  Why: slide bags vary from a hundred to 10,000+ cells; padding every bag to the largest
  would multiply the work of small ones. Power-of-two tiers bound the number of compiled
  shapes (log2(cap / 32) + 1); bags of one size get ``cap`` = ``bucket_length`` of it,
  as before.
  """
  length = multiple
  while length < n:
    length *= 2
  return min(length, cap)


def pad_batch(bags: Sequence[Bag], length: int, batch_size: int | None = None,
              dim: int | None = None) -> dict[str, np.ndarray]:
  """Stacks bags into x [B, length, D], mask, labels y and bag weights w.

  Slots beyond ``len(bags)`` (up to ``batch_size``) are empty bags of weight 0.
  """
  b = batch_size or len(bags)
  if len(bags) > b:
    raise ValueError(f"{len(bags)} bags do not fit a batch of {b}")
  d = dim if dim is not None else bags[0]["embeddings"].shape[1]
  x = np.zeros((b, length, d), np.float32)
  mask = np.zeros((b, length), bool)
  y = np.zeros((b,), np.int32)
  w = np.zeros((b,), np.float32)
  for i, bag in enumerate(bags):
    e = bag["embeddings"]
    n = e.shape[0]
    if n > length:
      raise ValueError(f"bag {bag.get('id')} has {n} cells, more than the padded length {length}")
    x[i, :n] = e
    mask[i, :n] = True
    y[i] = int(bag.get("label", 0))
    w[i] = 1.0
  return {"x": x, "mask": mask, "y": y, "w": w}


# ----------------------------------------------------------------------------- loss, steps


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


def eval_batch_size(length: int, dim: int, cap: int = 16) -> int:
  """Bags per evaluation batch, so that B * N * D stays under ~8M floats."""
  return max(1, min(cap, _EVAL_ELEMENTS // max(1, length * dim)))


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


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class FitResult:
  """What ``train_mil`` returns: the selected and the last parameters and the history."""
  params: Params  # selected epoch (see the module docstring)
  last_params: Params
  best_epoch: int
  selection: str  # how the epoch was selected, in words
  history: list[dict[str, Any]]  # one record per epoch
  length: int  # padded bag length used
  train_s: float  # seconds spent in training steps (incl. compilation)
  train_bags: int  # bags processed by training steps

  def steady_bags_per_s(self) -> float | None:
    """Training throughput after the first epoch (which includes the compilation)."""
    recs = self.history[1:] or self.history
    secs = sum(r["train_s"] for r in recs)
    return sum(r["train_bags"] for r in recs) / secs if recs and secs > 0 else None


def _selection_key(auc: float, loss: float) -> tuple[float, float]:
  return (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)


def _better(cand: tuple[float, float], best: tuple[float, float] | None) -> bool:
  """Higher AUC; at equal AUC (within 1e-9) lower loss; a full tie keeps the earlier."""
  if best is None:
    return True
  if cand[0] > best[0] + _TIE_EPS:
    return True
  if abs(cand[0] - best[0]) <= _TIE_EPS or cand[0] == best[0]:
    return cand[1] > best[1]
  return False


class Interrupted(Exception):
  """``train_mil`` stopped after a step (``stop``): ``trees`` and ``progress`` let it resume exactly."""

  def __init__(self, trees: Any, progress: dict[str, Any]):
    super().__init__(f"MIL training stopped after step {progress['global_step']}")
    self.trees, self.progress = trees, progress


def train_mil(train: Sequence[Bag], val: Sequence[Bag], mil_cfg: Any, key: jax.Array, *,
              length: int | None = None, progress: bool = True,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              mesh: jax.sharding.Mesh | None = None, num_classes: int = NUM_CLASSES,
              stop: Callable[[int], bool] | None = None,
              resume: tuple[Any, dict[str, Any]] | None = None) -> FitResult:
  """Trains the ``mil_cfg.model`` aggregator on ``train`` bags and selects on ``val``.

  Bags are dicts with ``embeddings`` [n, D] float32 and ``label`` (class index < ``num_classes``;
  0/1 by default) (and ``id``). Each step pads to the ``tier_length`` of its largest bag
  (at most ``length``), so bags of very different sizes do not all pay for the largest.
  Deterministic for a given ``key``. ``on_epoch`` receives each epoch's record. With
  ``mesh`` the steps and the validation scoring are data-parallel over its devices (see
  the module docstring); every process must call it with the same bags.
  Preemption: ``stop(step)`` is asked after every step; True raises ``Interrupted``
  with the host copies of the training state, and ``resume=(trees, progress)`` from it
  continues to the same result as an uninterrupted call.
  """
  if not train:
    raise UserError("no training bags for MIL")
  model = make_model(mil_cfg, num_classes)
  dim = int(train[0]["embeddings"].shape[1])
  length = length or bucket_length(max(b["embeddings"].shape[0] for b in list(train) + list(val)))
  k_init, k_shuffle, k_drop = jax.random.split(key, 3)
  params = init_model(model, k_init, dim)
  tx = make_optimizer(mil_cfg)
  opt_state = tx.init(params)
  bpe = int(mil_cfg.bags_per_step)
  slots, shard = step_layout(bpe, mesh.size if mesh is not None else 1)
  step_fn = make_train_step(model, tx, float(mil_cfg.cluster_weight), mesh, shard)
  forward = make_forward(model, mesh)
  if mesh is not None:
    params, opt_state, k_drop = parallel.replicate((params, opt_state, k_drop), mesh)
    batch_sharding = parallel.batch_sharding(mesh) if shard else parallel.replicated(mesh)
  n = len(train)
  steps_per_epoch = int(math.ceil(n / bpe))

  history: list[dict[str, Any]] = []
  best_key, best_params, best_epoch = None, params, 0
  train_s, train_bags, global_step = 0.0, 0, 0
  first_epoch, first_step, partial = 1, 0, None
  if resume is not None:
    trees, p = resume
    params, opt_state, best_params = trees["params"], trees["opt_state"], trees["best_params"]
    if mesh is not None:
      params, opt_state, best_params = parallel.replicate((params, opt_state, best_params), mesh)
    best_key = tuple(p["best_key"]) if p["best_key"] is not None else None
    best_epoch, history, train_s, train_bags = p["best_epoch"], list(p["history"]), p["train_s"], p["train_bags"]
    first_epoch, first_step, global_step = p["epoch"], p["step"], p["global_step"]
    partial = (p["step_losses"], p["step_parts"], p["step_bags"], p["epoch_s"])
  bar = progress_bar(range(first_epoch, int(mil_cfg.epochs) + 1), desc=f"mil[{mil_cfg.model}]", unit="epoch",
                     disable=not progress, leave=False)
  for epoch in bar:
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, epoch), n))
    t0 = time.perf_counter()
    step_losses, step_parts, step_bags = [], [], []
    s0 = 0
    if partial is not None:  # the epoch a preempted call stopped in
      step_losses, step_parts, step_bags = list(partial[0]), list(partial[1]), list(partial[2])
      s0, t0, partial = first_step, t0 - partial[3], None
    for s in range(s0, steps_per_epoch):
      idx = perm[s * bpe:(s + 1) * bpe]
      tier = tier_length(max(train[i]["embeddings"].shape[0] for i in idx), length)
      batch = pad_batch([train[i] for i in idx], tier, slots, dim)
      if mesh is not None:
        batch = parallel.host_to_global(batch, batch_sharding)
      params, opt_state, loss, parts = step_fn(params, opt_state, batch, k_drop, np.int32(global_step))
      global_step += 1
      step_losses.append(loss)
      step_parts.append(parts)
      step_bags.append(len(idx))
      if stop is not None and stop(global_step):
        losses_host, parts_host = jax.device_get((step_losses, step_parts))
        raise Interrupted(
            jax.device_get({"params": params, "opt_state": opt_state, "best_params": best_params}),
            {"epoch": epoch, "step": s + 1, "global_step": global_step,
             "best_key": list(best_key) if best_key is not None else None, "best_epoch": best_epoch,
             "history": history, "train_s": train_s, "train_bags": train_bags,
             "epoch_s": time.perf_counter() - t0, "step_bags": step_bags,
             "step_losses": [float(x) for x in losses_host],
             "step_parts": [{k: float(v) for k, v in d.items()} for d in parts_host]})
    step_losses, step_parts = jax.device_get((step_losses, step_parts))
    epoch_s = time.perf_counter() - t0
    train_s += epoch_s
    train_bags += n
    wts = np.asarray(step_bags, np.float64)
    record: dict[str, Any] = {
        "kind": "epoch", "epoch": epoch, "step": global_step, "train_s": epoch_s, "train_bags": n,
        "train_loss": float(np.dot(wts, np.asarray(step_losses, np.float64)) / wts.sum()),
    }
    for name in ("ce", "cluster", "proto_cluster"):
      record[f"train_{name}"] = float(np.dot(wts, [p[name] for p in step_parts]) / wts.sum())
    if not all(math.isfinite(record[k]) for k in ("train_loss", "train_ce")):
      raise UserError(f"MIL training loss became non-finite at epoch {epoch}; lower mil.lr "
                      f"(now {mil_cfg.lr}) or check the embeddings")
    if val:
      vm = split_metrics(val, predict(model, params, val, length, None, forward, mesh))
      record.update({f"val_{k}": v for k, v in vm.items()})
      cand = _selection_key(vm["auc"], vm["loss"])
      if _better(cand, best_key):
        best_key, best_params, best_epoch = cand, params, epoch
      record["best_epoch"] = best_epoch
      bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_auc=f"{vm['auc']:.3f}",
                      val_loss=f"{vm['loss']:.3f}", refresh=False)
    else:
      best_params, best_epoch = params, epoch
      record["best_epoch"] = best_epoch
      bar.set_postfix(loss=f"{record['train_loss']:.3f}", refresh=False)
    history.append(record)
    if on_epoch is not None:
      on_epoch(record)
  bar.close()
  if val:
    selection = (f"highest validation ROC-AUC on {len(val)} validation bags; ties broken by the "
                 "lower validation cross-entropy")
  else:
    selection = "last epoch (no validation bags)"
    logging.warning("MIL: no validation bags; using the last epoch (%d)", best_epoch)
  return FitResult(params=best_params, last_params=params, best_epoch=best_epoch,
                   selection=selection, history=history, length=length, train_s=train_s,
                   train_bags=train_bags)


# ----------------------------------------------------------------------------- I/O


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


RESUME_FILE = "resume.npz"  # the training state a preempted MIL stage saved (see preemption)


def _fingerprint(cfg: Any, workdir: str, length: int) -> str:
  """What a resume snapshot must have been made from: the MIL settings, the seed and the embeddings."""
  import hashlib  # pylint: disable=g-import-not-at-top
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
    trees, progress = preemption.load_snapshot(path, like)
  except Exception as e:  # pylint: disable=broad-except  (a damaged or foreign file: MIL is cheap to redo)
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
  ``mil/resume.npz`` and the stage stops (exit 143 / 130); the rerun continues from it
  to the same outputs as an uninterrupted run, then deletes it.
  """
  t_start = time.perf_counter()
  out = os.path.join(workdir, "mil")
  writer = parallel.is_writer()  # every process trains (sharded steps); process 0 writes
  mesh = parallel.data_mesh()
  os.makedirs(out, exist_ok=True)
  for stale in ("summary.json", "metrics.jsonl"):  # this attempt starts afresh (or from resume.npz)
    p = os.path.join(out, stale)
    if writer and os.path.exists(p):
      os.unlink(p)
  bags = load_embedded_bags(workdir)
  by_split = {s: [b for b in bags if b["split"] == s] for s in SPLITS}
  train, val, test = by_split["train"], by_split["val"], by_split["test"]
  if not train:
    raise UserError("no training bags in embeddings/index.json")
  labels = embedded_labels(workdir)
  num_classes = len(labels)
  if len({b["label"] for b in train}) < 2:
    raise UserError("the training bags hold one class only; MIL needs negative and positive bags")
  absent = [labels[c] for c in range(num_classes) if not any(b["label"] == c for b in train)]
  if absent:
    raise UserError(f"no training bag has the label(s) {', '.join(map(repr, absent))}; the MIL cannot learn them")
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

  metrics_path = os.path.join(out, "metrics.jsonl")
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), MIL_KEY_SALT)

  def log_epoch(record: dict[str, Any]) -> None:
    if writer:
      fileio.append_jsonl(metrics_path, metrics.json_safe(record))

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
    if writer:
      preemption.save_snapshot(resume_path, e.trees, {**e.progress, "fingerprint": fingerprint})
    parallel.sync("mil: resume snapshot written")
    stop = guard.stop(f"finished MIL step {e.progress['global_step']} (epoch {e.progress['epoch']}) and saved "
                      f"the training state in {resume_path}")
    logging.warning("%s", stop)
    raise stop from None
  finally:
    guard.restore()
  if writer and os.path.exists(resume_path):
    os.unlink(resume_path)  # training is complete: a rerun of this stage starts afresh
  logging.info("MIL: selected epoch %d (%s)", fit.best_epoch, fit.selection)
  ckpt_steps = save_checkpoints(os.path.join(out, "checkpoints"), fit, meta)

  model = make_model(cfg.mil, num_classes)
  forward = make_forward(model, mesh)
  predict(model, fit.params, test[:1] or train[:1], length, None, forward, mesh)  # compile outside timing
  t0 = time.perf_counter()
  test_pred = predict(model, fit.params, test, length, None, forward, mesh)
  infer_s = time.perf_counter() - t0
  preds = {"train": predict(model, fit.params, train, length, None, forward, mesh),
           "val": predict(model, fit.params, val, length, None, forward, mesh), "test": test_pred}
  ordered = train + val + test
  merged = {k: np.concatenate([preds[s][k] for s in SPLITS]) for k in ("prob", "pred", "probs", "logits")}
  for k in ("attention", "attention_branches"):
    merged[k] = [a for s in SPLITS for a in preds[s][k]]
  if writer:
    _write_predictions(out, ordered, merged, labels)

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
      "best_epoch": fit.best_epoch, "selection": fit.selection,
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
  if writer:
    fileio.write_json(os.path.join(out, "summary.json"), metrics.json_safe(summary))
  parallel.sync("mil: outputs written")  # the report stage reads what process 0 wrote
  logging.info("MIL done: best epoch %d, val %s, test %s", fit.best_epoch, summary["val_at_best"],
               summary["test"])
