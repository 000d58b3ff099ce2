"""The collapse monitor: effective rank and spread of probe embeddings, NT-Xent against chance, the verdict."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def ntxent_chance(pairs: int) -> float:
  """NT-Xent's value when all 2B embeddings coincide: ln(2B - 1) (every logit equal)."""
  return math.log(2 * pairs - 1) if pairs >= 1 else float("nan")


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
  from slamags_jax import bags as bags_lib
  from slamags_jax import config as config_lib
  pos, neg = bags_lib.pretrain_pools(manifest)
  pool = np.union1d(pos, neg)
  n = min(cfg.pretrain.probe_cells, len(pool))
  rng = np.random.default_rng([config_lib.data_seed(cfg), 7])
  return np.sort(rng.choice(pool, size=n, replace=False)) if n else np.zeros((0,), np.int64)
