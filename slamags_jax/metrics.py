"""Bag-level and cell-retrieval metrics (numpy; sklearn where it is the reference).

Bag level (abnormal = positive class, threshold 0.5 on the abnormal probability):
F1, ROC-AUC and accuracy. ROC-AUC is undefined when the labels hold one class only;
it is then NaN, not an error.

Cell retrieval, per positive bag: cells are ranked by their abnormal-class attention
(descending); witnesses (abnormal cells) are the relevant items.

- ``topk_found``: witnesses among the top K cells, with K_eff = min(K, bag size) (a bag
  smaller than K has all its cells "in the top K", so every witness is found).
  TIES at the K boundary count fractionally: the expected number of witnesses in the top
  K when tied scores are ordered uniformly at random. Cells scoring strictly above the
  K-th score all count; of the m cells tied with the K-th score, K - (cells above) slots
  remain and each is a witness with probability (witnesses among the m) / m. The result
  does not depend on the input order (a stable argsort would favour whoever comes first).
- ``recall_at_k`` = topk_found / number of witnesses in the bag.
- ``average_precision``: sklearn's ``average_precision_score`` over the whole ranking.
  It treats tied scores as ONE threshold: the tied block enters the precision-recall
  step function at once, with its block precision (no optimistic or pessimistic
  ordering inside the block). All-equal scores give AP = witness fraction of the bag.
  A bag without witnesses has AP NaN (recall undefined); such bags are negatives and
  are not averaged.

Means over bags skip NaN entries (a bag without witnesses) and are NaN if none remain.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm

THRESHOLD = 0.5


def _as_binary(labels: Sequence[int] | np.ndarray) -> np.ndarray:
  y = np.asarray(labels).astype(np.int64).reshape(-1)
  if y.size and not np.isin(y, (0, 1)).all():
    raise ValueError("labels must be 0 or 1")
  return y


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
  """ROC-AUC of ``scores`` for ``labels`` (1 = positive); NaN with one class present."""
  y = _as_binary(labels)
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  if y.size == 0 or y.min() == y.max():
    return float("nan")
  return float(skm.roc_auc_score(y, s))


def bag_metrics(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray,
                threshold: float = THRESHOLD) -> dict[str, float]:
  """F1 (abnormal positive), ROC-AUC and accuracy of abnormal probabilities ``probs``.

  A bag is predicted abnormal when its probability is >= ``threshold``. F1 is 0 when
  there are no predicted and no true positives (sklearn ``zero_division=0``).
  """
  y = _as_binary(labels)
  p = np.asarray(probs, dtype=np.float64).reshape(-1)
  if y.shape != p.shape:
    raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
  if y.size == 0:
    nan = float("nan")
    return {"f1": nan, "auc": nan, "accuracy": nan, "n": 0, "n_pos": 0}
  pred = (p >= threshold).astype(np.int64)
  return {
      "f1": float(skm.f1_score(y, pred, pos_label=1, zero_division=0)),
      "auc": roc_auc(y, p),
      "accuracy": float(skm.accuracy_score(y, pred)),
      "n": int(y.size),
      "n_pos": int(y.sum()),
  }


def topk_found(scores: Sequence[float] | np.ndarray, relevant: Sequence[int] | np.ndarray,
               k: int) -> float:
  """Expected relevant items among the top ``min(k, n)`` scores (ties shared fractionally)."""
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  r = _as_binary(relevant)
  if s.shape != r.shape:
    raise ValueError(f"scores {s.shape} and relevant {r.shape} differ in shape")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  n = s.size
  if n == 0:
    return 0.0
  k_eff = min(int(k), n)
  kth = np.sort(s)[::-1][k_eff - 1]  # the K-th largest score
  above = s > kth
  tied = s == kth
  slots = k_eff - int(above.sum())  # 1 <= slots <= number tied
  found = float(r[above].sum()) + slots * float(r[tied].sum()) / float(tied.sum())
  return found


def topk_found_curve(scores: Sequence[float] | np.ndarray,
                     relevant: Sequence[int] | np.ndarray) -> np.ndarray:
  """``topk_found(scores, relevant, k)`` for every k = 1..n at once (O(n log n)).

  Within a block of tied scores the count grows linearly (the same fractional rule).
  """
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  r = _as_binary(relevant).astype(np.float64)
  n = s.size
  if n == 0:
    return np.zeros(0)
  order = np.argsort(-s, kind="stable")
  ss, rr = s[order], r[order]
  starts = np.flatnonzero(np.concatenate([[True], ss[1:] != ss[:-1]]))
  ends = np.concatenate([starts[1:], [n]])
  block_w = np.add.reduceat(rr, starts)
  before = np.concatenate([[0.0], np.cumsum(block_w)[:-1]])
  block = np.repeat(np.arange(starts.size), ends - starts)
  k = np.arange(1, n + 1)
  return before[block] + (k - starts[block]) * block_w[block] / (ends - starts)[block]


def average_precision(scores: Sequence[float] | np.ndarray,
                      relevant: Sequence[int] | np.ndarray) -> float:
  """sklearn average precision (ties = one threshold); NaN without relevant items."""
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  r = _as_binary(relevant)
  if r.sum() == 0:
    return float("nan")
  return float(skm.average_precision_score(r, s))


def retrieval_metrics(scores: Sequence[float] | np.ndarray, relevant: Sequence[int] | np.ndarray,
                      k: int) -> dict[str, Any]:
  """Top-K found, recall@K and AP of one bag's ranking (see the module docstring)."""
  r = _as_binary(relevant)
  n_rel = int(r.sum())
  found = topk_found(scores, r, k)
  return {
      "n": int(r.size),
      "n_witnesses": n_rel,
      "k": int(k),
      "k_eff": int(min(k, r.size)),
      "topk_found": found,
      "recall_at_k": found / n_rel if n_rel else float("nan"),
      "average_precision": average_precision(scores, r),
  }


def nanmean(values: Sequence[float]) -> float:
  """Mean of the finite values; NaN if none (no warning)."""
  v = np.asarray([x for x in values if x is not None], dtype=np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


def nanstd(values: Sequence[float]) -> float:
  """Population standard deviation of the finite values; NaN if none."""
  v = np.asarray([x for x in values if x is not None], dtype=np.float64)
  v = v[np.isfinite(v)]
  return float(v.std()) if v.size else float("nan")


def mean_retrieval(per_bag: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means (and standard deviations) of the per-bag retrieval metrics."""
  out = {}
  for key in ("topk_found", "recall_at_k", "average_precision"):
    vals = [b[key] for b in per_bag]
    out[f"{key}_mean"] = nanmean(vals)
    out[f"{key}_std"] = nanstd(vals)
  out["n_bags"] = len(per_bag)
  return out


def stable_rank_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
  """Indices by descending score; ties keep their input order (for display, not metrics)."""
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  return np.argsort(-s, kind="stable")


def json_safe(obj: Any) -> Any:
  """Copy of ``obj`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def class_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, Any]:
  """Slide metrics for any number of classes from class probabilities ``probs`` [n, C].

  The call is the most probable class (for two classes this is p(class 1) > 0.5; the
  binary metrics above use >= 0.5, which differs only at exactly 0.5). Per class: one-vs-
  rest ROC-AUC of that class's probability (NaN when the class, or every other class, is
  absent), F1, precision and recall; ``macro_f1`` averages F1 over the classes present
  in ``labels`` or in the calls (sklearn's convention), ``macro_auc`` the defined
  per-class AUCs. ``confusion`` [true][called] counts slides.
  """
  y = np.asarray(labels, np.int64).reshape(-1)
  p = np.asarray(probs, np.float64).reshape(len(y), num_classes)
  nan = float("nan")
  if y.size == 0:
    return {"n": 0, "accuracy": nan, "macro_f1": nan, "macro_auc": nan, "per_class": [],
            "confusion": [[0] * num_classes for _ in range(num_classes)]}
  call = p.argmax(-1)
  per_class = []
  f1 = skm.f1_score(y, call, labels=list(range(num_classes)), average=None, zero_division=0)
  prec = skm.precision_score(y, call, labels=list(range(num_classes)), average=None, zero_division=0)
  rec = skm.recall_score(y, call, labels=list(range(num_classes)), average=None, zero_division=0)
  for c in range(num_classes):
    per_class.append({"auc": roc_auc((y == c).astype(np.int64), p[:, c]), "f1": float(f1[c]),
                      "precision": float(prec[c]), "recall": float(rec[c]), "n": int((y == c).sum())})
  seen = sorted(set(y.tolist()) | set(call.tolist()))
  return {
      "n": int(y.size),
      "accuracy": float(skm.accuracy_score(y, call)),
      "macro_f1": float(np.mean([f1[c] for c in seen])),
      "macro_auc": nanmean([pc["auc"] for pc in per_class]),
      "per_class": per_class,
      "confusion": skm.confusion_matrix(y, call, labels=list(range(num_classes))).tolist(),
  }
