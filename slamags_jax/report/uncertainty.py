"""How uncertain a patient-level result is: ROC-AUC intervals, calibration, temperature.

- ``delong_auc(y, score)``: ROC-AUC with DeLong's variance (DeLong et al., Biometrics
  1988), computed with the fast midrank algorithm of Sun & Xu (IEEE Signal Processing
  Letters 2014), and its 95 % interval AUC +- 1.96 sqrt(var), clipped to [0, 1]. This is
  the interval the reports quote (``bag_auc_ci95``; ``bag_auc_ci_method`` says so).
- ``bootstrap_auc_ci(y, score)``: the stratified bootstrap interval (positives and
  negatives resampled separately, percentile interval); the reports use it for macro
  AUC over more than two labels, the tests use it to check DeLong's.
- ``brier(y, probs)``, ``reliability_bins(y, p)``, ``expected_calibration_error``:
  calibration of class probabilities.
- ``fit_temperature(logits, y)``: the temperature T that minimises the cross-entropy of
  softmax(logits / T) on (validation) bags; ``apply_temperature``.
- ``pooled(rows)``: the pooled out-of-fold numbers of a cross-validation (every patient
  scored once, by the fold model that did not train on it): AUC with its interval,
  balanced accuracy, Brier score, reliability bins; ``pooled_markdown`` its table.

Pure numpy; no plotting (``report/html.py`` draws the curves as inline SVG).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Z95 = 1.959963984540054
DELONG = "DeLong (Sun & Xu fast algorithm), AUC +- 1.96 sd clipped to [0, 1]"
BOOTSTRAP = "stratified bootstrap (2000 resamples, percentile)"


def _midrank(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n of ``x`` with ties given their mean rank."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  n = len(x)
  ranks = np.empty(n, np.float64)
  i = 0
  while i < n:
    j = i
    while j < n and xs[j] == xs[i]:
      j += 1
    ranks[i:j] = 0.5 * (i + j - 1) + 1.0
    i = j
  out = np.empty(n, np.float64)
  out[order] = ranks
  return out


def delong_auc(y: Sequence[int], score: Sequence[float]) -> dict[str, Any]:
  """{auc, var, se, ci95: [lo, hi], n_pos, n_neg, method}; AUC of ``score`` for ``y == 1``.

  With one class only, everything is None (the AUC is undefined).
  """
  y = np.asarray(y).astype(bool)
  s = np.asarray(score, np.float64)
  pos, neg = s[y], s[~y]
  m, n = len(pos), len(neg)
  out: dict[str, Any] = {"auc": None, "var": None, "se": None, "ci95": None, "n_pos": int(m), "n_neg": int(n),
                         "method": DELONG}
  if m == 0 or n == 0:
    return out
  tx, ty = _midrank(pos), _midrank(neg)
  tz = _midrank(np.concatenate([pos, neg]))
  auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
  v01 = (tz[:m] - tx) / n  # per positive: share of negatives it outranks
  v10 = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives that outrank it
  sx = float(np.var(v01, ddof=1)) if m > 1 else 0.0
  sy = float(np.var(v10, ddof=1)) if n > 1 else 0.0
  var = sx / m + sy / n
  se = math.sqrt(max(var, 0.0))
  out.update(auc=float(auc), var=float(var), se=se,
             ci95=[max(0.0, float(auc) - Z95 * se), min(1.0, float(auc) + Z95 * se)])
  return out


def auc(y: Sequence[int], score: Sequence[float]) -> float:
  """Mann-Whitney ROC-AUC (ties count one half); NaN with one class."""
  r = delong_auc(y, score)["auc"]
  return float("nan") if r is None else r


def _macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
  vals = [auc(y == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
  return float(np.mean(vals)) if vals else float("nan")


def bootstrap_auc_ci(y: Sequence[int], score: Any, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> list[float] | None:
  """Stratified bootstrap percentile interval of the AUC (binary ``score`` [n]) or macro AUC (``score`` [n, C]).

  Each class's patients are resampled with replacement within the class, so every
  resample holds every class in its original count.
  """
  y = np.asarray(y, np.int64)
  s = np.asarray(score, np.float64)
  classes = np.unique(y)
  if len(classes) < 2:
    return None
  rng = np.random.default_rng(seed)
  idx_by = [np.flatnonzero(y == c) for c in classes]
  vals = []
  for _ in range(n_boot):
    idx = np.concatenate([rng.choice(ix, len(ix), replace=True) for ix in idx_by])
    vals.append(auc(y[idx], s[idx]) if s.ndim == 1 else _macro_auc(y[idx], s[idx]))
  lo, hi = np.nanpercentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return [float(lo), float(hi)]


def brier(y: Sequence[int], probs: Any) -> float:
  """Multi-class Brier score: mean over patients of sum_c (p_c - [y == c])^2 (binary: 2x the one-column score)."""
  y = np.asarray(y, np.int64)
  p = np.asarray(probs, np.float64)
  if p.ndim == 1:
    p = np.stack([1.0 - p, p], axis=1)
  onehot = np.eye(p.shape[1])[y]
  return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_bins(y: Sequence[int], p: Sequence[float], n_bins: int = 5) -> list[dict[str, Any]]:
  """Equal-width bins of the predicted probability ``p`` of the positive class: count, mean p, observed rate."""
  y = np.asarray(y, np.float64)
  p = np.asarray(p, np.float64)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
  out = []
  for b in range(n_bins):
    sel = which == b
    out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                "mean_p": float(p[sel].mean()) if sel.any() else None,
                "observed": float(y[sel].mean()) if sel.any() else None})
  return out


def expected_calibration_error(y: Sequence[int], p: Sequence[float], n_bins: int = 5) -> float:
  bins = reliability_bins(y, p, n_bins)
  n = sum(b["n"] for b in bins)
  return float(sum(b["n"] * abs(b["mean_p"] - b["observed"]) for b in bins if b["n"]) / max(n, 1))


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def nll(logits: Any, y: Sequence[int], temperature: float = 1.0) -> float:
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return float(-np.mean(logp[np.arange(len(z)), np.asarray(y, np.int64)]))


def fit_temperature(logits: Any, y: Sequence[int], lo: float = 0.05, hi: float = 100.0) -> float:
  """argmin_T NLL(softmax(logits / T), y) over T in [lo, hi] (golden-section search on log T).

  The NLL is convex in 1 / T, so the search finds its minimum; T > 1 softens
  overconfident probabilities, T < 1 sharpens. Fit it on validation bags, never test.
  """
  a, b = math.log(lo), math.log(hi)
  g = (math.sqrt(5) - 1) / 2
  c, d = b - g * (b - a), a + g * (b - a)
  fc, fd = nll(logits, y, math.exp(c)), nll(logits, y, math.exp(d))
  for _ in range(80):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - g * (b - a)
      fc = nll(logits, y, math.exp(c))
    else:
      a, c, fc = c, d, fd
      d = a + g * (b - a)
      fd = nll(logits, y, math.exp(d))
  return float(math.exp((a + b) / 2))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
  return _softmax(np.asarray(logits, np.float64) / float(temperature))


def balanced_accuracy(y: Sequence[int], pred: Sequence[int], num_classes: int) -> float:
  y, pred = np.asarray(y), np.asarray(pred)
  recalls = [float(np.mean(pred[y == c] == c)) for c in range(num_classes) if (y == c).any()]
  return float(np.mean(recalls)) if recalls else float("nan")


def auc_with_ci(y: Sequence[int], probs: Any) -> dict[str, Any]:
  """The report's AUC and its interval: DeLong for two labels (the abnormal class's
  probability), the stratified bootstrap of the macro AUC for more."""
  p = np.asarray(probs, np.float64)
  y = np.asarray(y, np.int64)
  if p.shape[1] == 2:
    d = delong_auc(y == 1, p[:, 1])
    return {"bag_auc": d["auc"], "bag_auc_ci95": d["ci95"], "bag_auc_se": d["se"], "bag_auc_ci_method": DELONG}
  return {"bag_auc": _macro_auc(y, p), "bag_auc_ci95": bootstrap_auc_ci(y, p), "bag_auc_se": None,
          "bag_auc_ci_method": BOOTSTRAP + " of the macro AUC"}


def summary_fields(y: Sequence[int], probs: Any) -> dict[str, Any]:
  """What a report adds to its summary: the AUC interval, Brier score and reliability bins."""
  p = np.asarray(probs, np.float64)
  out = auc_with_ci(y, p)
  out.pop("bag_auc")
  out["brier"] = brier(y, p)
  if p.shape[1] == 2:
    out["reliability_bins"] = reliability_bins(np.asarray(y) == 1, p[:, 1])
    out["ece"] = expected_calibration_error(np.asarray(y) == 1, p[:, 1])
  return out


def interval_text(summary: dict[str, Any]) -> str:
  ci = summary.get("bag_auc_ci95")
  a = summary.get("bag_auc")
  if a is None or ci is None:
    return "n/a"
  return f"{a:.3f} (95 % CI {ci[0]:.3f}-{ci[1]:.3f})"


def pooled(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
  """Pooled out-of-fold numbers from ``rows`` = [{slide_id, fold, label (name), probs}, ...]."""
  index = {n: i for i, n in enumerate(labels)}
  y = np.asarray([index[r["label"]] for r in rows], np.int64)
  p = np.asarray([r["probs"] for r in rows], np.float64)
  pred = p.argmax(axis=1)
  out: dict[str, Any] = {"n_slides": len(rows), "n_per_label": [int((y == c).sum()) for c in range(len(labels))]}
  out.update(auc_with_ci(y, p))
  out["accuracy"] = float(np.mean(pred == y))
  out["balanced_accuracy"] = balanced_accuracy(y, pred, len(labels))
  out["brier"] = brier(y, p)
  if p.shape[1] == 2:
    out["reliability_bins"] = reliability_bins(y == 1, p[:, 1])
    out["ece"] = expected_calibration_error(y == 1, p[:, 1])
  return out


def pooled_markdown(pool: dict[str, Any]) -> str:
  ci = pool.get("bag_auc_ci95")
  auc_text = "n/a" if pool.get("bag_auc") is None else (
      f"{pool['bag_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{pool['bag_auc']:.3f}")
  lines = ["## Pooled out-of-fold (every slide scored once, by the fold that did not train on it)\n",
           "| slides | ROC-AUC [95 % CI] | accuracy | balanced accuracy | Brier | ECE |", "|---|---|---|---|---|---|",
           f"| {pool['n_slides']} | {auc_text} | {pool['accuracy']:.3f} | {pool['balanced_accuracy']:.3f} | "
           f"{pool['brier']:.3f} | {pool['ece']:.3f} |" if pool.get("ece") is not None else
           f"| {pool['n_slides']} | {auc_text} | {pool['accuracy']:.3f} | {pool['balanced_accuracy']:.3f} | "
           f"{pool['brier']:.3f} | n/a |",
           "", f"Interval: {pool['bag_auc_ci_method']}. Brier: multi-class (sum over labels; 0 is perfect, 0.5 a "
           "constant 50 % guess for two labels).", ""]
  return "\n".join(lines)


def pooled_from_summaries(summaries: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
  """``pooled`` over the test slides of every fold's ``report/summary.json`` ([(fold, summary)]), plus the
  retrieval means over all annotated test slides (each fold's mean weighted by its slides) and the rows."""
  rows = [{**r, "fold": fold} for fold, s in summaries for r in (s.get("per_slide") or [])]
  labels = next((s.get("labels") for _, s in summaries if s.get("labels")), None)
  if not rows or not labels:
    return None
  out = pooled(rows, labels)
  out["labels"] = list(labels)
  for key in ("retrieval_ap_mean", "recall_at_k_mean", "topk_found_mean"):
    w = [(float(s.get("retrieval_slides") or 0), s.get(key)) for _, s in summaries]
    w = [(n, v) for n, v in w if n > 0 and isinstance(v, (int, float))]
    out[key] = float(sum(n * v for n, v in w) / sum(n for n, _ in w)) if w else None
  out["retrieval_slides"] = int(sum(int(s.get("retrieval_slides") or 0) for _, s in summaries))
  out["rows"] = rows
  return out
