"""Stage `report`: test-set metrics, a per-cell table, pictures and a readable report.

Reads the bags manifest (instance labels, image paths), the MIL predictions and
summaries of the earlier stages, and writes under ``<workdir>/report/``:

- ``cells.csv``: one row per (test bag, cell): bag, bag label, prediction and
  abnormal probability, cell id, image path, class, instance label, abnormal-class
  attention, attention x bag size (1 = uniform attention), rank in the bag.
- ``topk_gallery.png``: for ``report.gallery_bags`` positive test bags (chosen across
  the range of retrieval AP, best first) their top-ranked cells as thumbnails in rank
  order, at most ``report.gallery_max_cells`` per bag; witnesses framed in red.
- ``attention_hist.png``: attention (x bag size, log scale) of witness vs normal cells,
  and the share of witnesses found against the number of top cells reviewed.
- ``pretrain_loss.png``: pretraining losses (total and per task), the surgery cosine
  and the collapse monitor against step; a note instead for ``random`` (no steps).
- ``roc.png``: ROC curve of the test bags.
- ``report.md`` and, last (the stage's completion marker), ``summary.json``.

Metric definitions (ties, K larger than a bag) are those of ``slamags_jax.metrics``.
Display order in the gallery and the CSV ranks break attention ties by the bag's
cell order (metrics do not depend on that order).
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
import time
from typing import Any, Sequence

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from slamags_jax.runtime import fileio
from slamags_jax import metrics
from slamags_jax.runtime.errors import UserError

WITNESS_COLOR = "#d62728"  # red frame: true witness (abnormal cell)
NORMAL_COLOR = "#9e9e9e"  # thin grey frame: normal cell
NEG_BAG_COLOR = "#7f7f7f"
THUMB_PX = 96
CSV_COLUMNS = ("bag", "bag_label", "bag_pred", "bag_prob", "cell_id", "path", "cell_class",
               "instance_label", "attention", "attention_x_n", "rank")
REQUIRED_KEYS = ("method", "witness_rate", "seed", "bag_f1", "bag_auc", "bag_accuracy", "topk_k",
                 "topk_found_mean", "recall_at_k_mean", "retrieval_ap_mean")


# ----------------------------------------------------------------------------- inputs


def _read_json_if(path: str) -> dict[str, Any] | None:
  return fileio.read_json(path) if os.path.exists(path) else None


def _join(predictions: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> list[dict[str, Any]]:
  """Adds each cell's instance label, class and path (from the manifest) to the bags."""
  cells = {int(c["id"]): c for c in manifest["cells"]}
  out = []
  for p in predictions:
    missing = [int(c) for c in p["cell_ids"] if int(c) not in cells]
    if missing:
      raise UserError(f"bag {p['id']}: cell {missing[0]} is not in the bags manifest; the embeddings "
                      "were made from another manifest (rerun the embed and mil stages)")
    entries = [cells[int(c)] for c in p["cell_ids"]]
    out.append({**p,
                "instance_labels": np.asarray([int(e["label"]) for e in entries], np.int64),
                "classes": [str(e.get("class", "")) for e in entries],
                "paths": [str(e["path"]) for e in entries]})
  return out


def evaluate(test_bags: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
  """Bag metrics and per-positive-bag retrieval metrics of joined test bags."""
  bag = metrics.bag_metrics([b["label"] for b in test_bags], [b["prob"] for b in test_bags])
  per_bag = []
  for b in test_bags:
    if b["label"] != 1:
      continue
    r = metrics.retrieval_metrics(b["attention"], b["instance_labels"], k)
    r.update({"bag": b["id"], "prob": b["prob"], "pred": b["pred"]})
    br = b.get("attention_branches")
    if br is not None and br.ndim == 2 and br.shape[1] == 2:  # PAMIL: normal-class branch too
      r["average_precision_normal_branch"] = metrics.average_precision(br[:, 0], b["instance_labels"])
    per_bag.append(r)
  return {"bag": bag, "per_bag": per_bag, "retrieval": metrics.mean_retrieval(per_bag)}


# ----------------------------------------------------------------------------- pictures


def _png(fig: Figure) -> bytes:
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=fig.dpi)
  return buf.getvalue()


def _thumbnail(path: str) -> np.ndarray | None:
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      im.thumbnail((THUMB_PX, THUMB_PX))
      return np.asarray(im)
  except (OSError, ValueError):
    return None


def _gallery_choice(per_bag: Sequence[dict[str, Any]], n: int) -> list[int]:
  """Indices of ``n`` positive bags spread over the AP range, best first."""
  if n <= 0 or not per_bag:
    return []
  aps = np.asarray([b["average_precision"] if math.isfinite(b["average_precision"]) else -1.0
                    for b in per_bag])
  order = np.argsort(-aps, kind="stable")
  picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
  return [int(order[i]) for i in picks]


def _fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def _found(x: float) -> str:
  return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def gallery_figure(bags: Sequence[dict[str, Any]], per_bag: Sequence[dict[str, Any]], root: str,
                   k: int, max_cells: int, title: str, abnormal_name: str) -> Figure:
  """Top-ranked cells of some positive test bags as thumbnails, witnesses framed."""
  rows = [bags[i] for i in range(len(bags))]
  if not rows:
    fig = Figure(figsize=(8, 2), dpi=100)
    fig.text(0.5, 0.5, "No positive test bags: nothing to show.", ha="center", va="center", fontsize=13)
    return fig
  cols = max(1, min(max_cells, k, max(len(b["attention"]) for b in rows)))
  cell_in, label_in, margin_in = 0.95, 2.6, 0.1
  grid_w = label_in + cols * cell_in
  width = max(11.0, grid_w + 2 * margin_in)
  note = ("Cells in rank order of abnormal-class attention (value above each cell; the bag's "
          "attention sums to 1); true class below. Rows: positive test bags across the range of "
          "retrieval AP, best first.")
  if k > cols:
    note += f" Showing the top {cols} of the top {k}."
  note_lines = textwrap.wrap(note, width=int(width * 13))
  header_in = 0.95 + 0.19 * len(note_lines) + 0.25
  height = header_in + len(rows) * 1.32 + 0.1
  fig = Figure(figsize=(width, height), dpi=100)
  gs = fig.add_gridspec(len(rows), cols + 1, left=margin_in / width, right=(margin_in + grid_w) / width,
                        top=1.0 - header_in / height, bottom=0.1 / height,
                        width_ratios=[label_in / cell_in] + [1.0] * cols, wspace=0.06, hspace=0.42)
  for r, (bag, stats) in enumerate(zip(rows, per_bag)):
    order = metrics.stable_rank_order(bag["attention"])
    n = len(order)
    shown = min(cols, k, n)
    lab = fig.add_subplot(gs[r, 0])
    lab.axis("off")
    lab.text(0.02, 0.5,
             f"{bag['id']}  ({n} cells)\n"
             f"p(abnormal) = {bag['prob']:.3f}\n"
             f"called: {'abnormal' if bag['pred'] else 'normal (missed)'}\n"
             f"top {min(k, n)}: {_found(stats['topk_found'])} of {stats['n_witnesses']} witnesses\n"
             f"retrieval AP {stats['average_precision']:.2f}",
             ha="left", va="center", fontsize=9, family="monospace", linespacing=1.35,
             transform=lab.transAxes)
    for c in range(cols):
      ax = fig.add_subplot(gs[r, c + 1])
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= shown:
        ax.axis("off")
        continue
      i = int(order[c])
      img = _thumbnail(os.path.join(root, bag["paths"][i]))
      if img is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center", fontsize=7, transform=ax.transAxes)
      else:
        ax.imshow(img)
      witness = bool(bag["instance_labels"][i])
      for side in ax.spines.values():
        side.set_edgecolor(WITNESS_COLOR if witness else NORMAL_COLOR)
        side.set_linewidth(4.5 if witness else 0.8)
      ax.set_title(f"#{c + 1}  {bag['attention'][i]:.3g}", fontsize=8, pad=2)
      ax.set_xlabel(bag["classes"][i][:12], fontsize=7, labelpad=1,
                    color=WITNESS_COLOR if witness else "#333333")
  x0 = margin_in / width
  fig.text(x0, 1.0 - 0.12 / height, title, fontsize=13, ha="left", va="top")
  fig.legend(handles=[Patch(facecolor="none", edgecolor=WITNESS_COLOR, linewidth=3,
                            label=f"true witness ({abnormal_name})"),
                      Patch(facecolor="none", edgecolor=NORMAL_COLOR, linewidth=1, label="normal cell")],
             loc="upper left", ncol=2, fontsize=10, frameon=False, borderaxespad=0.0,
             bbox_to_anchor=(x0, 1.0 - 0.5 / height))
  fig.text(x0, 1.0 - 0.9 / height, "\n".join(note_lines), fontsize=9, ha="left", va="top")
  return fig


def attention_figure(test_bags: Sequence[dict[str, Any]], k: int, title: str) -> Figure:
  """Attention x bag size of witness vs normal cells; witnesses found vs cells reviewed."""
  fig = Figure(figsize=(12.5, 4.6), dpi=100)
  ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1.0], "wspace": 0.25})
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
  fig.suptitle(title, fontsize=12)
  fig.subplots_adjust(left=0.06, right=0.98, top=0.84, bottom=0.13)
  return fig


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or y.size < window:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate([head, (c[window:] - c[:-window]) / window])


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
  ax = axes[0]
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
  i = 1
  if has_cos:
    ax = axes[i]
    i += 1
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
  if epochs:
    ax = axes[i]
    ex = [r.get("step", r["epoch"]) for r in epochs]
    ax.plot(ex, [r["effective_rank"] for r in epochs], marker="o", color="#2ca02c")
    ax.set_xlabel("step (end of epoch)")
    ax.set_ylabel("effective rank of probe embeddings")
    ax.set_title("Collapse monitor (higher = less collapsed)", fontsize=10)
    ax.grid(alpha=0.3)
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


# ----------------------------------------------------------------------------- tables


def write_cells_csv(path: str, test_bags: Sequence[dict[str, Any]]) -> int:
  """One row per (test bag, cell); returns the number of rows."""
  rows = 0
  with fileio.atomic_open(path, "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for b in test_bags:
      n = len(b["attention"])
      rank = np.empty(n, np.int64)
      rank[metrics.stable_rank_order(b["attention"])] = np.arange(1, n + 1)
      for i in range(n):
        a = float(b["attention"][i])
        w.writerow([b["id"], b["label"], b["pred"], f"{b['prob']:.6f}", int(b["cell_ids"][i]),
                    b["paths"][i], b["classes"][i], int(b["instance_labels"][i]), f"{a:.6g}",
                    f"{a * n:.6g}", int(rank[i])])
        rows += 1
  return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, digits: int = 3) -> str:
  if not math.isfinite(mean):
    return "n/a"
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _collapse_cell(s: dict[str, Any]) -> str:
  if s.get("collapsed") is None:
    return "n/a"
  if not s["collapsed"]:
    return "no"
  return "**yes**: " + "; ".join((s.get("collapse") or {}).get("reasons", []))


def markdown(s: dict[str, Any], per_bag: Sequence[dict[str, Any]], pictures: dict[str, str]) -> str:
  """The human-readable report (``s`` = the summary dict)."""
  k = s["topk_k"]
  md = [f"# SLAM-AGS report: `{s['method']}`, witness rate {100 * s['witness_rate']:g}%, seed {s['seed']}\n",
        "Slide (bag) classification and abnormal-cell retrieval on the held-out test bags. "
        "Abnormal = positive class; a bag is called abnormal when p(abnormal) >= 0.5. "
        "Cells are ranked by the MIL model's abnormal-class attention.\n",
        "## Run settings\n",
        _md_table(["setting", "value"], [
            ["pretraining method", f"`{s['method']}`"],
            ["witness rate", f"{100 * s['witness_rate']:g}%"],
            ["seed", s["seed"]],
            ["MIL aggregator", f"`{s['mil_model']}`"],
            ["MIL selected epoch", f"{_fmt(s.get('mil_best_epoch'))} ({s.get('mil_selection', 'n/a')})"],
            ["bags (train / val / test)", " / ".join(
                f"{s['n_bags'][sp]} ({s['n_pos_bags'][sp]} abnormal)" for sp in ("train", "val", "test"))],
            ["cells per test bag (mean)", _fmt(s.get("test_bag_size_mean"), 1)],
            ["witnesses per positive test bag (mean)", _fmt(s.get("witnesses_per_pos_bag_mean"), 1)],
            ["K (top-K retrieval)", k],
            ["pretraining wall time (s)", _fmt(s.get("pretrain_wall_s"), 1)],
            ["final effective rank of embeddings", _fmt(s.get("final_effective_rank"), 2)],
            ["effective rank of the head / pooled features",
             f"{_fmt(s.get('final_head_effective_rank'), 2)} / {_fmt(s.get('final_pooled_effective_rank'), 2)}"],
            ["mean task-gradient cosine / conflict fraction",
             f"{_fmt(s.get('mean_task_cosine'))} / {_fmt(s.get('conflict_fraction'))}"],
            ["pretraining collapsed", _collapse_cell(s)],
        ]),
        "## Bag classification (test)\n",
        _md_table(["F1 (abnormal)", "ROC-AUC", "accuracy", "test bags"],
                  [[_fmt(s["bag_f1"]), _fmt(s["bag_auc"]), _fmt(s["bag_accuracy"]),
                    f"{s['n_test_bags']} ({s['n_pos_bags']['test']} abnormal)"]]),
        f"## Abnormal-cell retrieval (positive test bags, K = {k})\n",
        "Mean ± standard deviation over the positive test bags. *Found in top K*: true witnesses among "
        "the K cells with the highest attention (K is cut to the bag size; tied attention at the "
        "K-th place counts fractionally). *Recall@K*: found / witnesses in the bag. *AP*: average "
        "precision of the whole ranking. The random-ranking row is what a uniformly shuffled "
        "ranking gives in expectation.\n",
        _md_table(["ranking", f"found in top {k}", f"recall@{k}", "AP"], [
            ["MIL attention", _pm(s["topk_found_mean"], s["topk_found_std"], 2),
             _pm(s["recall_at_k_mean"], s["recall_at_k_std"]), _pm(s["retrieval_ap_mean"], s["retrieval_ap_std"])],
            ["random ranking", _fmt(s.get("random_topk_found_mean"), 2), _fmt(s.get("random_recall_at_k_mean")),
             f"≈ {_fmt(s.get('random_ap_mean'))} (witness fraction)"],
        ])]
  if s.get("collapsed"):
    md.insert(1, "> **Pretraining collapsed** (" + "; ".join(s["collapse"].get("reasons", [])) + "): the "
              "embeddings carry little information, so the numbers below are close to what an "
              "untrained encoder gives. See `pretrain/summary.json` (`collapse`) and the README's "
              "methods section for settings that avoid it.\n")
  if s.get("retrieval_ap_mean_normal_branch") is not None:
    md.append(f"Diagnostic (PAMIL): AP of the *normal-class* attention branch = "
              f"{_fmt(s['retrieval_ap_mean_normal_branch'])}. PAMIL's per-class attention is not tied to "
              "a class by the loss; if this is high while the abnormal-class AP is low, the model "
              "detects witnesses with the other branch.\n")
  md.append("## Pictures\n")
  captions = {
      "topk_gallery": "Top-ranked cells of positive test bags (red frame = true witness)",
      "attention_hist": "Attention of witness vs normal cells, and witnesses found vs cells reviewed",
      "roc": "ROC curve of the test bags",
      "pretrain_loss": "Pretraining curves",
  }
  for name, fname in pictures.items():
    md.append(f"### {captions.get(name, name)}\n\n![{captions.get(name, name)}]({fname})\n")
  md.append("## Positive test bags\n")
  md.append(_md_table(
      ["bag", "cells", "witnesses", "p(abnormal)", "called", f"found in top {k}", f"recall@{k}", "AP"],
      [[b["bag"], b["n"], b["n_witnesses"], f"{b['prob']:.3f}", "abnormal" if b["pred"] else "normal",
        _found(b["topk_found"]), _fmt(b["recall_at_k"]), _fmt(b["average_precision"])] for b in per_bag]))
  md.append("\nPer-cell values: `cells.csv`. Machine-readable summary: `summary.json`.\n")
  return "\n".join(md)


# ----------------------------------------------------------------------------- stage


def run(cfg: Any, workdir: str) -> None:
  """The ``report`` stage (see the module docstring).

  With several processes (multi-host), process 0 writes the report and the others wait
  for it (nothing here is a collective computation).
  """
  from slamags_jax import bags as bags_lib
  from slamags_jax import mil as mil_lib
  from slamags_jax.runtime import parallel
  # Every process decided to run this stage before process 0 can complete it (writing the
  # stage's marker): a process that checked later would skip it and miss the barriers.
  parallel.sync("report: start")
  if not parallel.is_writer():
    parallel.sync("report: written")
    return
  t0 = time.perf_counter()
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  marker = os.path.join(out, "summary.json")
  if os.path.exists(marker):
    os.unlink(marker)
  manifest = bags_lib.load_manifest(workdir)
  if manifest.get("source") == "slides":  # the user's slides: per-class metrics, no simulation
    from slamags_jax.report import slides as report_slides  # pylint: disable=g-import-not-at-top
    report_slides.run(cfg, workdir, manifest, out)
    parallel.sync("report: written")
    return
  mil_summary = _read_json_if(os.path.join(workdir, "mil", "summary.json"))
  if mil_summary is None:
    raise UserError(f"{os.path.join(workdir, 'mil', 'summary.json')} not found: run the mil stage first")
  predictions = _join(mil_lib.load_predictions(workdir), manifest)
  test = [b for b in predictions if b["split"] == "test"]
  if not test:
    raise UserError("no test bags in the MIL predictions")
  k = int(cfg.report.topk)
  ev = evaluate(test, k)
  per_bag, ret, bag = ev["per_bag"], ev["retrieval"], ev["bag"]
  pre = _read_json_if(os.path.join(workdir, "pretrain", "summary.json")) or {}
  method = cfg.pretrain.method
  wr = float(cfg.bags.witness_rate)
  counts = {sp: sum(1 for b in manifest["bags"] if b["split"] == sp) for sp in ("train", "val", "test")}
  pos_counts = {sp: sum(1 for b in manifest["bags"] if b["split"] == sp and b["label"] == 1)
                for sp in ("train", "val", "test")}
  abnormal_names = sorted({str(c.get("class", "")) for c in manifest["cells"] if int(c["label"]) == 1})
  abnormal_name = ", ".join(n for n in abnormal_names if n) or "abnormal cell"
  pos = [b for b in test if b["label"] == 1]
  rand_found = [min(k, len(b["attention"])) * b["instance_labels"].sum() / len(b["attention"]) for b in pos]
  rand_rec = [min(k, len(b["attention"])) / len(b["attention"]) for b in pos]
  rand_ap = [b["instance_labels"].sum() / len(b["attention"]) for b in pos]

  summary: dict[str, Any] = {
      "method": method, "witness_rate": wr, "seed": int(cfg.seed),
      "bag_f1": bag["f1"], "bag_auc": bag["auc"], "bag_accuracy": bag["accuracy"],
      "topk_k": k,
      "topk_found_mean": ret["topk_found_mean"], "topk_found_std": ret["topk_found_std"],
      "recall_at_k_mean": ret["recall_at_k_mean"], "recall_at_k_std": ret["recall_at_k_std"],
      "retrieval_ap_mean": ret["average_precision_mean"], "retrieval_ap_std": ret["average_precision_std"],
      "random_topk_found_mean": metrics.nanmean(rand_found),
      "random_recall_at_k_mean": metrics.nanmean(rand_rec),
      "random_ap_mean": metrics.nanmean(rand_ap),
      "mil_model": mil_summary.get("model", cfg.mil.model),
      "mil_best_epoch": mil_summary.get("best_epoch"),
      "mil_selection": mil_summary.get("selection"),
      "mil_val_at_best": mil_summary.get("val_at_best"),
      "mil_train_wall_s": mil_summary.get("train_wall_s"),
      "n_test_bags": len(test), "n_pos_test_bags": len(pos),
      "n_bags": counts, "n_pos_bags": pos_counts,
      "test_bag_size_mean": float(np.mean([len(b["attention"]) for b in test])),
      "witnesses_per_pos_bag_mean": metrics.nanmean([float(b["instance_labels"].sum()) for b in pos]),
      "per_bag": [{kk: r[kk] for kk in ("bag", "n", "n_witnesses", "prob", "pred", "topk_found",
                                        "recall_at_k", "average_precision")} for r in per_bag],
  }
  if any("average_precision_normal_branch" in r for r in per_bag):
    summary["retrieval_ap_mean_normal_branch"] = metrics.nanmean(
        [r.get("average_precision_normal_branch", float("nan")) for r in per_bag])
  # Validation bags, for model and setting selection (benchmark "Selection"): the same
  # metrics on the bags the MIL model was selected on; never the test bags.
  val = [b for b in predictions if b["split"] == "val"]
  if val:
    ev_val = evaluate(val, k)
    summary.update({"val_bag_auc": ev_val["bag"]["auc"], "val_bag_f1": ev_val["bag"]["f1"],
                    "val_topk_found_mean": ev_val["retrieval"]["topk_found_mean"],
                    "val_recall_at_k_mean": ev_val["retrieval"]["recall_at_k_mean"],
                    "val_retrieval_ap_mean": ev_val["retrieval"]["average_precision_mean"],
                    "n_val_bags": len(val)})
  for key in ("final_effective_rank", "final_head_effective_rank", "final_pooled_effective_rank",
              "conflict_fraction", "mean_task_cosine", "collapsed", "collapse"):
    if pre.get(key) is not None:
      summary[key] = pre[key]
  if pre.get("wall_s") is not None:
    summary["pretrain_wall_s"] = pre["wall_s"]
  if pre.get("steps") is not None:
    summary["pretrain_steps"] = pre["steps"]

  n_rows = write_cells_csv(os.path.join(out, "cells.csv"), test)
  title = (f"{method} | witness rate {100 * wr:g}% | seed {cfg.seed} | MIL {summary['mil_model']}")
  gallery_idx = _gallery_choice(per_bag, int(cfg.report.gallery_bags))
  by_id = {b["id"]: b for b in test}
  pictures: dict[str, str] = {}
  if int(cfg.report.gallery_bags) > 0:
    fig = gallery_figure([by_id[per_bag[i]["bag"]] for i in gallery_idx], [per_bag[i] for i in gallery_idx],
                         manifest["root"], k, int(cfg.report.gallery_max_cells),
                         f"Top-{k} cells by abnormal-class attention  |  {title}", abnormal_name)
    fileio.write_bytes(os.path.join(out, "topk_gallery.png"), _png(fig))
    pictures["topk_gallery"] = "topk_gallery.png"
  fileio.write_bytes(os.path.join(out, "attention_hist.png"), _png(attention_figure(test, k, title)))
  pictures["attention_hist"] = "attention_hist.png"
  fileio.write_bytes(os.path.join(out, "roc.png"), _png(roc_figure(
      test, f"ROC of the {len(test)} test bags\n{title}")))
  pictures["roc"] = "roc.png"
  metrics_path = os.path.join(workdir, "pretrain", "metrics.jsonl")
  missing = None
  if not os.path.exists(metrics_path) and method != "random":
    missing = f"No pretraining curve: {metrics_path} not found."
  fileio.write_bytes(os.path.join(out, "pretrain_loss.png"), _png(
      pretrain_figure(fileio.read_jsonl(metrics_path), method,
                      f"Pretraining  |  {method} | witness rate {100 * wr:g}% | seed {cfg.seed}", missing)))
  pictures["pretrain_loss"] = "pretrain_loss.png"
  summary["pictures"] = sorted(pictures.values())
  summary["cells_csv_rows"] = n_rows
  summary["report_wall_s"] = time.perf_counter() - t0

  fileio.write_text(os.path.join(out, "report.md"), markdown(summary, per_bag, pictures))
  fileio.write_json(marker, metrics.json_safe(summary))
  parallel.sync("report: written")
  logging.info("report: bag F1 %s AUC %s acc %s | top-%d found %s recall %s AP %s -> %s",
               _fmt(bag["f1"]), _fmt(bag["auc"]), _fmt(bag["accuracy"]), k, _fmt(ret["topk_found_mean"], 2),
               _fmt(ret["recall_at_k_mean"]), _fmt(ret["average_precision_mean"]), out)
