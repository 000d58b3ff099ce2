"""The report for slide bags (``bags.source=slides``), and the tables and galleries ``predict`` shares.

Under ``<workdir>/report/`` for the test slides of the run's split:

- ``cells.csv``: one row per (test slide, cell): slide id, slide label, called label,
  cell path, the cell's annotation (empty without ``data.cell_labels_csv``), attention
  per class (PAMIL; ABMIL has one branch: ``attention``), rank in the slide by the
  ranking attention (the abnormal class's for two labels, the called label's for more).
- ``gallery/<slide_id>.png``: each test slide's top-ranked cells (at most
  ``report.gallery_max_cells``), annotated witnesses framed in red.
- ``report.md`` and, last (the stage's marker), ``summary.json``: accuracy, per-class
  ROC-AUC (one vs rest), F1, precision and recall, macro F1 and AUC, the confusion
  matrix, per-slide probabilities; retrieval metrics (top-K found, recall@K, AP) only on
  test slides with annotated cells, where the relevant cells are those annotated with
  the slide's label and unannotated cells count as not relevant (a lower bound when the
  annotation is partial). Without annotations: rankings and galleries, no retrieval.

``bag_f1`` / ``bag_auc`` in the summary are the abnormal class's F1 and AUC for two
labels and the macro F1 / macro AUC for more, so that fold tables compare like with like.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from typing import Any, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from slamags_jax import metrics
from slamags_jax.report import html as report_html
from slamags_jax.report import uncertainty
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

THUMB_PX = 72
WITNESS_RGB = (214, 39, 40)


def attention_columns(labels: Sequence[str], branches: int) -> list[str]:
  """``attention_<label>`` per class when the model has a branch per class, else ``attention``."""
  if branches == len(labels):
    return [f"attention_{name}" for name in labels]
  return ["attention"]


def ranks(scores: np.ndarray) -> np.ndarray:
  """1 = highest score; ties keep the slide's cell order."""
  r = np.empty(len(scores), np.int64)
  r[metrics.stable_rank_order(scores)] = np.arange(1, len(scores) + 1)
  return r


def write_cells_csv(path: str, slides: Sequence[dict[str, Any]], labels: Sequence[str],
                    with_truth: bool) -> int:
  """One row per (slide, cell): ``slide_id[, label, called], path[, annotation]``, attention, rank."""
  branches = slides[0]["attention_branches"].shape[1] if slides else 1
  att_cols = attention_columns(labels, branches)
  header = ["slide_id"] + (["label", "called"] if with_truth else []) + ["path"] + \
      (["annotation"] if with_truth else []) + att_cols + ["rank"]
  rows = 0
  with fileio.atomic_open(path, "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    for s in slides:
      r = ranks(s["attention"])
      called = labels[int(s["pred"])]
      for i, p in enumerate(s["paths"]):
        row = [s["id"]] + ([labels[int(s["label"])], called] if with_truth else []) + [p]
        if with_truth:
          row.append(s["annotations"][i])
        row += [f"{float(x):.6g}" for x in s["attention_branches"][i]] + [int(r[i])]
        w.writerow(row)
        rows += 1
  return rows


def _thumb(path: str) -> Image.Image:
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      im.thumbnail((THUMB_PX, THUMB_PX))
      return im.copy()
  except (OSError, ValueError):
    return Image.new("RGB", (THUMB_PX, THUMB_PX), (235, 235, 235))


def gallery_png(root: str, slide: dict[str, Any], title: str, max_cells: int, per_row: int = 10) -> bytes:
  """The slide's top-ranked cells in rank order (rank and attention x n under each), as PNG bytes.

  Cells with ``witness`` set are framed red (annotated cells of the slide's label).
  """
  att = np.asarray(slide["attention"], np.float64)
  order = metrics.stable_rank_order(att)[:max_cells]
  n = len(att)
  cols = max(1, min(per_row, len(order)))
  rows = max(1, -(-len(order) // cols))
  cell_w, cell_h, top = THUMB_PX + 8, THUMB_PX + 22, 26
  img = Image.new("RGB", (max(cols * cell_w + 8, 420), top + rows * cell_h + 4), "white")
  draw = ImageDraw.Draw(img)
  draw.text((6, 6), title, fill="black")
  witness = slide.get("witness")
  for j, i in enumerate(order):
    x, y = 6 + (j % cols) * cell_w, top + (j // cols) * cell_h
    th = _thumb(os.path.join(root, slide["paths"][int(i)]))
    img.paste(th, (x + 1 + (THUMB_PX - th.width) // 2, y + 1 + (THUMB_PX - th.height) // 2))
    if witness is not None and witness[int(i)]:
      draw.rectangle([x - 1, y - 1, x + THUMB_PX + 2, y + THUMB_PX + 2], outline=WITNESS_RGB, width=3)
    draw.text((x + 2, y + THUMB_PX + 5), f"#{j + 1} {att[int(i)] * n:.2g}", fill="black")
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def safe_name(slide_id: str) -> str:
  """A file name for a slide id (its folder name; other characters replaced)."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", slide_id) or "slide"


def write_galleries(folder: str, root: str, slides: Sequence[dict[str, Any]], labels: Sequence[str],
                    max_cells: int) -> list[str]:
  """``<folder>/<slide>.png`` for every slide; returns the file names (relative to ``folder``'s parent)."""
  os.makedirs(folder, exist_ok=True)
  names = []
  for s in slides:
    called = labels[int(s["pred"])]
    truth = f" | label {labels[int(s['label'])]}" if s.get("label") is not None else ""
    title = (f"{s['id']} | called {called} (p={float(s['probs'][int(s['pred'])]):.3f}){truth} | "
             f"{len(s['attention'])} cells | top cells by attention (value x cells)")
    name = f"{safe_name(s['id'])}.png"
    fileio.write_bytes(os.path.join(folder, name), gallery_png(root, s, title, max_cells))
    names.append(os.path.join(os.path.basename(folder), name))
  return names


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def slide_rows(slides: Sequence[dict[str, Any]], labels: Sequence[str], with_truth: bool) -> list[list[Any]]:
  return [[s["id"], len(s["attention"])] + ([labels[int(s["label"])]] if with_truth else [])
          + [labels[int(s["pred"])]] + [f"{float(p):.3f}" for p in s["probs"]] for s in slides]


def _retrieval(test: Sequence[dict[str, Any]], labels: Sequence[str], negative: set[str], k: int) -> list[dict[str, Any]]:
  per = []
  for s in test:
    name = labels[int(s["label"])]
    if name in negative or not any(s["annotations"]):
      continue
    relevant = np.asarray([a == name for a in s["annotations"]], np.int64)
    if not relevant.any():
      continue
    br = s["attention_branches"]
    score = br[:, int(s["label"])] if br.shape[1] == len(labels) and len(labels) > 2 else s["attention"]
    r = metrics.retrieval_metrics(score, relevant, k)
    r.update({"bag": s["id"], "annotated": int(sum(bool(a) for a in s["annotations"]))})
    per.append(r)
  return per


def run(cfg: Any, workdir: str, manifest: dict[str, Any], out: str) -> None:
  """Writes the slide report under ``out`` (``summary.json`` last)."""
  from slamags_jax import mil as mil_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  labels = list(manifest["labels"])
  negative = set(manifest.get("negative_labels") or [])
  cells = manifest["cells"]
  mil_summary = fileio.read_json(os.path.join(workdir, "mil", "summary.json"))
  test = []
  for p in mil_lib.load_predictions(workdir):
    if p["split"] != "test":
      continue
    entries = [cells[int(c)] for c in p["cell_ids"]]
    test.append({**p, "paths": [e["path"] for e in entries], "annotations": [e.get("class", "") for e in entries],
                 "witness": [bool(e.get("label")) for e in entries]})
  if not test:
    raise UserError("no test slides in the MIL predictions (every slide is in train or val)")
  num_classes = len(labels)
  y = [int(s["label"]) for s in test]
  probs = np.stack([np.asarray(s["probs"], np.float64) for s in test])
  cm = metrics.class_metrics(y, probs, num_classes)
  if num_classes == 2:
    binary = metrics.bag_metrics(y, probs[:, 1])
    f1, auc, acc = binary["f1"], binary["auc"], binary["accuracy"]
  else:
    f1, auc, acc = cm["macro_f1"], cm["macro_auc"], cm["accuracy"]
  k = int(cfg.report.topk)
  per = _retrieval(test, labels, negative, k)
  ret = metrics.mean_retrieval(per) if per else None
  pre = fileio.read_json(os.path.join(workdir, "pretrain", "summary.json")) \
      if os.path.exists(os.path.join(workdir, "pretrain", "summary.json")) else {}
  counts = {sp: sum(b["split"] == sp for b in manifest["bags"]) for sp in ("train", "val", "test")}
  summary: dict[str, Any] = {
      "source": "slides", "method": cfg.pretrain.method, "seed": int(cfg.seed), "witness_rate": None,
      "split_from": manifest["settings"].get("split_from"), "fold": int(cfg.bags.fold), "folds": int(cfg.bags.folds),
      "labels": labels, "negative_labels": sorted(negative),
      "bag_f1": f1, "bag_auc": auc, "bag_accuracy": acc,
      "macro_f1": cm["macro_f1"], "macro_auc": cm["macro_auc"],
      "per_class": {labels[c]: cm["per_class"][c] for c in range(num_classes)},
      "confusion": cm["confusion"],
      "n_bags": counts, "n_test_bags": len(test),
      "mil_model": mil_summary.get("model"), "mil_best_epoch": mil_summary.get("best_epoch"),
      "mil_selection": mil_summary.get("selection"),
      "topk_k": k, "annotated_cells": int(manifest.get("annotated_cells", 0)),
      "retrieval_slides": len(per),
      "per_slide": [{"slide_id": s["id"], "label": labels[int(s["label"])], "called": labels[int(s["pred"])],
                     "cells": len(s["attention"]), "probs": [float(x) for x in s["probs"]]} for s in test],
  }
  for key in ("topk_found_mean", "recall_at_k_mean", "retrieval_ap_mean"):
    summary[key] = None
  if ret is not None:
    summary.update({"topk_found_mean": ret["topk_found_mean"], "topk_found_std": ret["topk_found_std"],
                    "recall_at_k_mean": ret["recall_at_k_mean"], "recall_at_k_std": ret["recall_at_k_std"],
                    "retrieval_ap_mean": ret["average_precision_mean"],
                    "retrieval_ap_std": ret["average_precision_std"]})
  for key in ("final_effective_rank", "collapsed", "wall_s", "steps"):
    if pre.get(key) is not None:
      summary[f"pretrain_{key}" if key in ("wall_s", "steps") else key] = pre[key]

  summary.update(uncertainty.summary_fields(y, probs))  # the AUC's 95 % interval, Brier score, reliability
  n_rows = write_cells_csv(os.path.join(out, "cells.csv"), test, labels, with_truth=True)
  galleries = write_galleries(os.path.join(out, "gallery"), manifest["root"], test, labels,
                              int(cfg.report.gallery_max_cells))
  summary["cells_csv_rows"] = n_rows
  summary["galleries"] = galleries
  summary["report_html"] = os.path.basename(report_html.write(  # the review page
      os.path.join(out, "report.html"), manifest["root"], test, labels, summary=summary,
      max_cells=int(cfg.report.gallery_max_cells),
      title=f"Test slides: {cfg.pretrain.method}, {summary['split_from']}, seed {cfg.seed}"))

  md = [f"# SLAM-AGS slide report: `{cfg.pretrain.method}`, {summary['split_from']}, seed {cfg.seed}\n",
        f"Test slides of this split, classified into {num_classes} labels ({', '.join(labels)}; normal: "
        f"{', '.join(sorted(negative))}). The called label is the most probable one.\n",
        md_table(["slides (train / val / test)", "MIL", "selected epoch"],
                 [[f"{counts['train']} / {counts['val']} / {counts['test']}", f"`{summary['mil_model']}`",
                   f"{fmt(summary['mil_best_epoch'])} ({summary['mil_selection']})"]]),
        "## Slide classification (test)\n",
        md_table(["accuracy", "macro F1", "macro ROC-AUC (one vs rest)"],
                 [[fmt(cm["accuracy"]), fmt(cm["macro_f1"]), fmt(cm["macro_auc"])]]),
        md_table(["label", "test slides", "ROC-AUC (one vs rest)", "F1", "precision", "recall"],
                 [[labels[c], cm["per_class"][c]["n"], fmt(cm["per_class"][c]["auc"]), fmt(cm["per_class"][c]["f1"]),
                   fmt(cm["per_class"][c]["precision"]), fmt(cm["per_class"][c]["recall"])] for c in range(num_classes)]),
        f"Patient-level ROC-AUC {uncertainty.interval_text(summary)}: {summary['bag_auc_ci_method']}. "
        f"Brier score {fmt(summary['brier'])}. Review page: `report.html`.\n",
        "Confusion matrix (rows: true label, columns: called label):\n",
        md_table(["true \\ called"] + labels, [[labels[c]] + cm["confusion"][c] for c in range(num_classes)])]
  if ret is not None:
    md += [f"## Cell retrieval (test slides with annotated cells, K = {k})\n",
           "Relevant cells: those annotated with the slide's label; unannotated cells count as not "
           "relevant (a lower bound when the annotation is partial).\n",
           md_table(["slides", f"found in top {k}", f"recall@{k}", "AP"],
                    [[len(per), fmt(ret["topk_found_mean"], 2), fmt(ret["recall_at_k_mean"]),
                      fmt(ret["average_precision_mean"])]])]
  else:
    md.append("No cell annotations on the test slides (`data.cell_labels_csv`): rankings and galleries only, "
              "no retrieval metrics.\n")
  md += ["## Test slides\n", md_table(["slide", "cells", "label", "called"] + [f"p({n})" for n in labels],
                                     slide_rows(test, labels, True)),
         "## Top cells per slide\n"]
  md += [f"![{s['id']}]({g})\n" for s, g in zip(test, galleries)]
  md.append("\nPer-cell attention and ranks: `cells.csv`. Machine-readable summary: `summary.json`.\n")
  summary["report_wall_s"] = time.perf_counter() - t0
  fileio.write_text(os.path.join(out, "report.md"), "\n".join(md))
  fileio.write_json(os.path.join(out, "summary.json"), metrics.json_safe(summary))
  logging.info("report: %d test slides, accuracy %s, macro F1 %s, macro AUC %s -> %s", len(test),
               fmt(cm["accuracy"]), fmt(cm["macro_f1"]), fmt(cm["macro_auc"]), out)
