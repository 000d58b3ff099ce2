"""The report's matplotlib figures: attention of witnesses vs normal cells, pretraining curves, ROC."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slamags_jax import metrics

WITNESS_COLOR = "#d62728"  # true witness (abnormal cell)
NEG_BAG_COLOR = "#7f7f7f"


def png(fig: Figure) -> bytes:
  """The figure as PNG bytes at its own dpi."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=fig.dpi)
  return buf.getvalue()


def _attention_hist(ax: Any, test_bags: Sequence[dict[str, Any]]) -> None:
  """Histogram of attention x bag size: witnesses and normal cells of positive bags, negative bags."""
  pos = [b for b in test_bags if b["label"] == 1]
  neg = [b for b in test_bags if b["label"] == 0]
  wit = np.concatenate([b["attention"][b["instance_labels"] == 1] * len(b["attention"]) for b in pos]
                       ) if pos else np.zeros(0)
  nor = np.concatenate([b["attention"][b["instance_labels"] == 0] * len(b["attention"]) for b in pos]
                       ) if pos else np.zeros(0)
  negc = np.concatenate([b["attention"] * len(b["attention"]) for b in neg]) if neg else np.zeros(0)
  floor = 1e-3
  series = [(nor, "normal cells, positive bags", "#1f77b4", "stepfilled", 0.35),
            (wit, "witnesses, positive bags", WITNESS_COLOR, "stepfilled", 0.45),
            (negc, "cells of negative bags", NEG_BAG_COLOR, "step", 1.0)]
  allv = np.concatenate([s[0] for s in series]) if any(s[0].size for s in series) else np.zeros(0)
  if allv.size:
    lo = max(floor, float(allv[allv > 0].min()) if (allv > 0).any() else floor)
    hi = max(float(allv.max()), lo)
    near_uniform = hi / lo < 1.5  # log bins would put everything in one bar
    if near_uniform:
      pad = max(hi - lo, 1e-6) * 0.05
      bins = np.linspace(lo - pad, hi + pad, 40)
    else:
      bins = np.logspace(np.log10(lo), np.log10(hi), 40)
    for values, label, color, htype, alpha in series:
      if values.size:
        ax.hist(np.clip(values, lo, hi), bins=bins, density=False,
                weights=np.full(values.size, 1.0 / values.size), histtype=htype, color=color,
                alpha=alpha, linewidth=1.6, label=f"{label} (n={values.size})")
    if near_uniform:
      ax.text(0.98, 0.97, f"nearly uniform attention:\nall cells within {lo:.3g} to {hi:.3g} x 1/n",
              transform=ax.transAxes, ha="right", va="top", fontsize=9)
    else:
      ax.set_xscale("log")
    if bins[0] <= 1.0 <= bins[-1]:
      ax.axvline(1.0, color="black", linestyle=":", linewidth=1.2, label="uniform attention (1/n)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.5)  # headroom for the legend
    ax.legend(fontsize=8.5, loc="upper left", frameon=False)
    clipped = bool((allv < lo).any())
  else:
    ax.text(0.5, 0.5, "no test bags", ha="center", va="center", transform=ax.transAxes)
    clipped = near_uniform = False
  ax.set_xlabel("abnormal-class attention x bag size (" + ("" if near_uniform else "log scale; ")
                + "1 = uniform)"
                + (f"; values < {floor:g} in the first bar" if clipped else ""), fontsize=9)
  ax.set_ylabel("share of cells in each group")
  ax.set_title("Attention of witness vs normal cells (test bags)", fontsize=11)


def _recall_curve(ax2: Any, pos: Sequence[dict[str, Any]], k: int) -> None:
  """Share of the witnesses found against the number of top cells reviewed, vs a random ranking."""
  if pos:
    n_max = max(len(b["attention"]) for b in pos)
    xs = np.arange(1, n_max + 1)
    curves, base = [], []
    for b in pos:
      n = len(b["attention"])
      w = max(int(b["instance_labels"].sum()), 1)
      found = metrics.topk_found_curve(b["attention"], b["instance_labels"])
      found = np.concatenate([found, np.full(n_max - n, found[-1])])  # beyond the bag: all found
      curves.append(found / w)
      base.append(np.minimum(xs, n) / n)
    ax2.plot(xs, np.mean(curves, 0), color=WITNESS_COLOR, linewidth=2, label="attention ranking (mean)")
    ax2.fill_between(xs, np.min(curves, 0), np.max(curves, 0), color=WITNESS_COLOR, alpha=0.15,
                     label="range over bags")
    ax2.plot(xs, np.mean(base, 0), color="black", linestyle="--", linewidth=1, label="random ranking")
    ax2.axvline(min(k, n_max), color="#555555", linestyle=":", linewidth=1.2,
                label=f"K = {k}" + (" (more than the bag)" if k > n_max else ""))
    ax2.set_xscale("log" if n_max > 60 else "linear")
    ax2.set_xlim(1, n_max)
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8.5, loc="lower right", frameon=False)
  else:
    ax2.text(0.5, 0.5, "no positive test bags", ha="center", va="center", transform=ax2.transAxes)
  ax2.set_xlabel("top-ranked cells reviewed per bag")
  ax2.set_ylabel("share of the bag's witnesses found (recall)")
  ax2.set_title("Witnesses found vs cells reviewed (positive test bags)", fontsize=11)
  ax2.grid(alpha=0.3)


def attention_figure(test_bags: Sequence[dict[str, Any]], k: int, title: str) -> Figure:
  """Attention x bag size of witness vs normal cells; witnesses found vs cells reviewed."""
  fig = Figure(figsize=(12.5, 4.6), dpi=100)
  ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1.0], "wspace": 0.25})
  _attention_hist(ax, test_bags)
  _recall_curve(ax2, [b for b in test_bags if b["label"] == 1], k)
  fig.suptitle(title, fontsize=12)
  fig.subplots_adjust(left=0.06, right=0.98, top=0.84, bottom=0.13)
  return fig


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or y.size < window:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate([head, (c[window:] - c[:-window]) / window])


def _loss_panel(ax: Any, steps: Sequence[dict[str, Any]], x: np.ndarray, window: int,
                task_keys: Sequence[str]) -> None:
  """Total and per-task loss against step (smoothed over ``window`` steps, raw values faint)."""
  colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
  series = [("loss", "total", "black")] + [(k, k[5:], colors[i % len(colors)]) for i, k in enumerate(task_keys)]
  if len(task_keys) == 1:
    series = series[:1]  # single task: its loss is the total
  positive = True
  for key, label, color in series:
    y = np.asarray([r.get(key, np.nan) for r in steps], np.float64)
    ok = np.isfinite(y)
    positive &= bool((y[ok] > 0).all())
    if window > 1:
      ax.plot(x[ok], y[ok], color=color, alpha=0.25, linewidth=0.8)
    ax.plot(x[ok], _smooth(y[ok], window), color=color, linewidth=1.8, label=label)
  ymin = min(np.nanmin([r.get(k, np.nan) for r in steps]) for k, _, _ in series)
  ymax = max(np.nanmax([r.get(k, np.nan) for r in steps]) for k, _, _ in series)
  if positive and ymin > 0 and ymax / ymin > 30:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("Pretraining loss" + (f" (moving average of {window} steps)" if window > 1 else ""),
               fontsize=10)
  ax.legend(fontsize=9, frameon=False)
  ax.grid(alpha=0.3)


def _cosine_panel(ax: Any, steps: Sequence[dict[str, Any]], window: int) -> None:
  """Cosine between the task gradients (surgery) against step, with the conflicting share."""
  cs = [(r["step"], r["surgery/cosine"]) for r in steps if "surgery/cosine" in r]
  cx, cy = np.asarray(cs, np.float64).T
  if window > 1:
    ax.plot(cx, cy, color="#9467bd", alpha=0.3, linewidth=0.8)
  ax.plot(cx, _smooth(cy, window), color="#9467bd", linewidth=1.8, label="cosine(task gradients)")
  ax.axhline(0.0, color="black", linewidth=1, linestyle=":")
  conflict = float(np.mean(cy < 0))
  proj = [r["surgery/projected"] for r in steps if "surgery/projected" in r]
  note = f"conflicting steps (cos < 0): {100 * conflict:.0f}%"
  if proj:
    note += f"\nprojected steps: {100 * float(np.mean(proj)):.0f}%"
  ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=9)
  ax.set_xlabel("step")
  ax.set_ylabel("cosine between task gradients")
  ax.set_ylim(-1.02, 1.02)
  ax.set_title("Gradient conflict between the tasks", fontsize=10)
  ax.grid(alpha=0.3)


def _rank_panel(ax: Any, epochs: Sequence[dict[str, Any]]) -> None:
  """Effective rank of the probe embeddings at the end of each epoch."""
  ex = [r.get("step", r["epoch"]) for r in epochs]
  ax.plot(ex, [r["effective_rank"] for r in epochs], marker="o", color="#2ca02c")
  ax.set_xlabel("step (end of epoch)")
  ax.set_ylabel("effective rank of probe embeddings")
  ax.set_title("Collapse monitor (higher = less collapsed)", fontsize=10)
  ax.grid(alpha=0.3)


def pretrain_figure(records: Sequence[dict[str, Any]], method: str, title: str,
                    missing_note: str | None = None) -> Figure:
  """Pretraining loss (total, per task), surgery cosine and effective rank against step."""
  steps = [r for r in records if r.get("kind") == "step" and not r.get("skipped")
           and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
  if not steps:
    fig = Figure(figsize=(9, 3), dpi=100)
    msg = missing_note or (
        f"No pretraining curve: method '{method}' ran no training steps\n"
        "(the encoder is the random initialisation)." if method == "random"
        else f"No pretraining steps were logged for method '{method}'.")
    fig.text(0.5, 0.55, msg, ha="center", va="center", fontsize=13)
    fig.text(0.5, 0.15, title, ha="center", va="center", fontsize=10, color="#555555")
    return fig
  x = np.asarray([r["step"] for r in steps], np.float64)
  window = max(1, len(steps) // 40)
  task_keys = sorted({k for r in steps for k in r if k.startswith("loss/")})
  has_cos = any("surgery/cosine" in r for r in steps)
  epochs = [r for r in records if r.get("kind") == "epoch" and r.get("effective_rank") is not None]
  n_panels = 1 + int(has_cos) + int(bool(epochs))
  fig = Figure(figsize=(5.2 * n_panels, 4.3), dpi=100)
  axes = np.atleast_1d(fig.subplots(1, n_panels))
  _loss_panel(axes[0], steps, x, window, task_keys)
  i = 1
  if has_cos:
    _cosine_panel(axes[i], steps, window)
    i += 1
  if epochs:
    _rank_panel(axes[i], epochs)
  fig.suptitle(title, fontsize=12)
  fig.subplots_adjust(left=0.07 if n_panels > 1 else 0.1, right=0.98, top=0.84, bottom=0.13, wspace=0.28)
  return fig


def roc_figure(test_bags: Sequence[dict[str, Any]], title: str) -> Figure:
  """ROC curve of the test bags' abnormal probability."""
  from sklearn.metrics import roc_curve
  fig = Figure(figsize=(4.8, 4.6), dpi=100)
  ax = fig.subplots()
  y = np.asarray([b["label"] for b in test_bags])
  p = np.asarray([b["prob"] for b in test_bags])
  auc = metrics.roc_auc(y, p)
  if math.isfinite(auc):
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, color=WITNESS_COLOR, linewidth=2, label=f"MIL (AUC = {auc:.3f})")
  else:
    ax.text(0.5, 0.5, "ROC undefined:\ntest bags of one class only", ha="center", va="center")
  ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="chance")
  ax.set_xlabel("false positive rate (normal bags called abnormal)", fontsize=9)
  ax.set_ylabel("true positive rate (abnormal bags found)", fontsize=9)
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.legend(loc="lower right", fontsize=9, frameon=False)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10)
  fig.subplots_adjust(left=0.14, right=0.97, top=0.88, bottom=0.12)
  return fig
