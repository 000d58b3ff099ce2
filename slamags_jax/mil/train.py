"""The MIL training loop and its model selection on validation bags (see the package docstring)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from slamags_jax.mil.batching import Bag, Params, bucket_length, pad_batch, tier_length
from slamags_jax.mil.inference import predict, split_metrics
from slamags_jax.mil.steps import (
  make_forward,
  make_optimizer,
  make_train_step,
  step_layout,
)
from slamags_jax.models.mil import (
  NUM_CLASSES,
  init_model,
  make_model,
)
from slamags_jax.runtime import parallel
from slamags_jax.runtime.errors import UserError
from slamags_jax.runtime.progress import progress as progress_bar

_TIE_EPS = 1e-9


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
  mode = selection_mode(mil_cfg, len(val))
  last_epoch = mode == "last_epoch"
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
    (params, opt_state, best_params, best_key, best_epoch, history, train_s, train_bags, first_epoch, first_step,
     global_step, partial) = _unpack_resume(resume, mesh)
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
        raise _interrupted(
            {"params": params, "opt_state": opt_state, "best_params": best_params},
            {"epoch": epoch, "step": s + 1, "global_step": global_step,
             "best_key": list(best_key) if best_key is not None else None, "best_epoch": best_epoch,
             "history": history, "train_s": train_s, "train_bags": train_bags,
             "epoch_s": time.perf_counter() - t0, "step_bags": step_bags}, step_losses, step_parts)
    step_losses, step_parts = jax.device_get((step_losses, step_parts))
    epoch_s = time.perf_counter() - t0
    train_s += epoch_s
    train_bags += n
    record = _epoch_record(epoch, global_step, epoch_s, n, step_bags, step_losses, step_parts, mil_cfg)
    vm = split_metrics(val, predict(model, params, val, length, None, forward, mesh)) if val else None
    cand = _candidate(vm, mode)
    if cand is None or last_epoch:
      best_params, best_epoch = params, epoch
    elif _better(cand, best_key):
      best_key, best_params, best_epoch = cand, params, epoch
    record.update({f"val_{k}": v for k, v in (vm or {}).items()}, best_epoch=best_epoch)
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", refresh=False,
                    **({"val_auc": f"{vm['auc']:.3f}", "val_loss": f"{vm['loss']:.3f}"} if vm else {}))
    history.append(record)
    if on_epoch is not None:
      on_epoch(record)
  bar.close()
  selection = _selection_text(len(val), best_epoch, last_epoch, mode)
  return FitResult(params=best_params, last_params=params, best_epoch=best_epoch,
                   selection=selection, history=history, length=length, train_s=train_s,
                   train_bags=train_bags)


def _candidate(vm: dict[str, float] | None, mode: str) -> tuple[float, float] | None:
  """The selection key of an epoch's validation metrics (None without validation bags)."""
  if vm is None:
    return None
  if mode == "val_loss":  # lowest validation cross-entropy, then AUC
    return _selection_key(-vm["loss"], -vm["auc"])
  return _selection_key(vm["auc"], vm["loss"])


def _unpack_resume(resume: tuple[Any, dict[str, Any]], mesh: jax.sharding.Mesh | None) -> tuple:
  """The loop state saved by ``Interrupted``: trees (replicated over ``mesh``) and counters."""
  trees, p = resume
  params, opt_state, best_params = trees["params"], trees["opt_state"], trees["best_params"]
  if mesh is not None:
    params, opt_state, best_params = parallel.replicate((params, opt_state, best_params), mesh)
  best_key = tuple(p["best_key"]) if p["best_key"] is not None else None
  partial = (p["step_losses"], p["step_parts"], p["step_bags"], p["epoch_s"])
  return (params, opt_state, best_params, best_key, p["best_epoch"], list(p["history"]), p["train_s"],
          p["train_bags"], p["epoch"], p["step"], p["global_step"], partial)


def _epoch_record(epoch: int, global_step: int, epoch_s: float, n: int, step_bags: Sequence[int],
                  step_losses: Sequence[float], step_parts: Sequence[dict[str, float]], mil_cfg: Any) -> dict[str, Any]:
  """One epoch's metrics line: bag-weighted means of the step losses; non-finite is an error."""
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
  return record


def selection_mode(mil_cfg: Any, n_val: int) -> str:
  """``mil.selection``; ``UserError`` when it is ``val_auc`` and there is nothing to select on."""
  mode = str(getattr(mil_cfg, "selection", "val_auc"))
  if mode in ("val_auc", "val_loss") and not n_val:
    raise UserError(NO_VALIDATION_ERROR)
  return mode


NO_VALIDATION_ERROR = (
    "no validation bags for MIL model selection (mil.selection=val_auc or val_loss): give validation bags "
    "(bags.val_fraction > 0; with bags.source=slides a `val` split in data.slides_csv, or train/test only and "
    "bags.val_fraction > 0 carves them), or set --config.mil.selection=last_epoch to use the last epoch "
    "without selection")


def _selection_text(n_val: int, best_epoch: int, last_epoch: bool = False, mode: str = "val_auc") -> str:
  """How the epoch was selected, in words."""
  if last_epoch:
    return (f"last epoch (mil.selection=last_epoch; {n_val} validation bags scored, not used)" if n_val
            else "last epoch (mil.selection=last_epoch; no validation bags)")
  if mode == "val_loss":
    return f"lowest validation cross-entropy on {n_val} validation bags; ties broken by the higher validation ROC-AUC"
  return f"highest validation ROC-AUC on {n_val} validation bags; ties broken by the lower validation cross-entropy"


def _interrupted(trees: Any, progress: dict[str, Any], step_losses: list, step_parts: list) -> Interrupted:
  """The ``Interrupted`` that lets ``train_mil`` resume mid-epoch: host trees, counters, this epoch's steps."""
  losses_host, parts_host = jax.device_get((step_losses, step_parts))
  return Interrupted(jax.device_get(trees), {
      **progress, "step_losses": [float(x) for x in losses_host],
      "step_parts": [{k: float(v) for k, v in d.items()} for d in parts_host]})
