"""The report for slide bags (``bags.source=slides``); its cell table and galleries are shared with ``predict``.

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

The cell table is ``cells_csv.write_slide_cells_csv``, the galleries ``gallery.write_galleries``.
``bag_f1`` / ``bag_auc`` in the summary are the abnormal class's F1 and AUC for two
labels and the macro F1 / macro AUC for more, so that fold tables compare like with like.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from slamags_jax import metrics
from slamags_jax.report import cells_csv, gallery, uncertainty
from slamags_jax.report import html as report_html
from slamags_jax.report.tables import fmt, md_table, slide_rows
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

SPLITS = ("train", "val", "test")


def _retrieval(test: Sequence[dict[str, Any]], labels: Sequence[str], negative: set[str],
               k: int) -> list[dict[str, Any]]:
  """Retrieval metrics per test slide with cells annotated with its (abnormal) label."""
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


def _load_test(workdir: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
  """The test slides' predictions with their cells' paths, annotations and witness flags."""
  from slamags_jax import mil as mil_lib
  cells = manifest["cells"]
  test = []
  for p in mil_lib.load_predictions(workdir):
    if p["split"] != "test":
      continue
    entries = [cells[int(c)] for c in p["cell_ids"]]
    test.append({**p, "paths": [e["path"] for e in entries], "annotations": [e.get("class", "") for e in entries],
                 "witness": [bool(e.get("label")) for e in entries]})
  if not test:
    raise UserError("no test slides in the MIL predictions (every slide is in train or val)")
  return test


def _summary(cfg: Any, workdir: str, manifest: dict[str, Any], test: Sequence[dict[str, Any]],
             cm: dict[str, Any], per: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """summary.json's content without the output files (``cm`` = class metrics, ``per`` = retrieval per slide)."""
  labels = list(manifest["labels"])
  negative = set(manifest.get("negative_labels") or [])
  num_classes = len(labels)
  if num_classes == 2:
    binary = metrics.bag_metrics([int(s["label"]) for s in test], [float(s["probs"][1]) for s in test])
    f1, auc, acc = binary["f1"], binary["auc"], binary["accuracy"]
  else:
    f1, auc, acc = cm["macro_f1"], cm["macro_auc"], cm["accuracy"]
  mil_summary = fileio.read_json(os.path.join(workdir, "mil", "summary.json"))
  pre_path = os.path.join(workdir, "pretrain", "summary.json")
  pre = fileio.read_json(pre_path) if os.path.exists(pre_path) else {}
  summary: dict[str, Any] = {
      "source": "slides", "method": cfg.pretrain.method, "seed": int(cfg.seed), "witness_rate": None,
      "split_from": manifest["settings"].get("split_from"), "fold": int(cfg.bags.fold), "folds": int(cfg.bags.folds),
      "labels": labels, "negative_labels": sorted(negative),
      "bag_f1": f1, "bag_auc": auc, "bag_accuracy": acc,
      "macro_f1": cm["macro_f1"], "macro_auc": cm["macro_auc"],
      "per_class": {labels[c]: cm["per_class"][c] for c in range(num_classes)},
      "confusion": cm["confusion"],
      "n_bags": {sp: sum(b["split"] == sp for b in manifest["bags"]) for sp in SPLITS}, "n_test_bags": len(test),
      "mil_model": mil_summary.get("model"), "mil_best_epoch": mil_summary.get("best_epoch"),
      "mil_selection": mil_summary.get("selection"),
      "topk_k": int(cfg.report.topk), "annotated_cells": int(manifest.get("annotated_cells", 0)),
      "retrieval_slides": len(per),
      "per_slide": [{"slide_id": s["id"], "label": labels[int(s["label"])], "called": labels[int(s["pred"])],
                     "cells": len(s["attention"]), "probs": [float(x) for x in s["probs"]]} for s in test],
  }
  for key in ("topk_found_mean", "recall_at_k_mean", "retrieval_ap_mean"):
    summary[key] = None
  if per:
    ret = metrics.mean_retrieval(per)
    summary.update({"topk_found_mean": ret["topk_found_mean"], "topk_found_std": ret["topk_found_std"],
                    "recall_at_k_mean": ret["recall_at_k_mean"], "recall_at_k_std": ret["recall_at_k_std"],
                    "retrieval_ap_mean": ret["average_precision_mean"],
                    "retrieval_ap_std": ret["average_precision_std"]})
  for key in ("final_effective_rank", "collapsed", "wall_s", "steps"):
    if pre.get(key) is not None:
      summary[f"pretrain_{key}" if key in ("wall_s", "steps") else key] = pre[key]
  return summary


def _markdown(s: dict[str, Any], test: Sequence[dict[str, Any]], cm: dict[str, Any], galleries: Sequence[str]) -> str:
  labels, counts, k = s["labels"], s["n_bags"], s["topk_k"]
  num_classes = len(labels)
  md = [f"# SLAM-AGS slide report: `{s['method']}`, {s['split_from']}, seed {s['seed']}\n",
        f"Test slides of this split, classified into {num_classes} labels ({', '.join(labels)}; normal: "
        f"{', '.join(s['negative_labels'])}). The called label is the most probable one.\n",
        md_table(["slides (train / val / test)", "MIL", "selected epoch"],
                 [[f"{counts['train']} / {counts['val']} / {counts['test']}", f"`{s['mil_model']}`",
                   f"{fmt(s['mil_best_epoch'])} ({s['mil_selection']})"]]),
        "## Slide classification (test)\n",
        md_table(["accuracy", "macro F1", "macro ROC-AUC (one vs rest)"],
                 [[fmt(cm["accuracy"]), fmt(cm["macro_f1"]), fmt(cm["macro_auc"])]]),
        md_table(["label", "test slides", "ROC-AUC (one vs rest)", "F1", "precision", "recall"],
                 [[labels[c], pc["n"], fmt(pc["auc"]), fmt(pc["f1"]), fmt(pc["precision"]), fmt(pc["recall"])]
                  for c, pc in enumerate(cm["per_class"])]),
        f"Patient-level ROC-AUC {uncertainty.interval_text(s)}: {s['bag_auc_ci_method']}. "
        f"Brier score {fmt(s['brier'])}. Review page: `report.html`.\n",
        "Confusion matrix (rows: true label, columns: called label):\n",
        md_table(["true \\ called"] + labels, [[labels[c]] + cm["confusion"][c] for c in range(num_classes)])]
  if s["retrieval_slides"]:
    md += [f"## Cell retrieval (test slides with annotated cells, K = {k})\n",
           "Relevant cells: those annotated with the slide's label; unannotated cells count as not "
           "relevant (a lower bound when the annotation is partial).\n",
           md_table(["slides", f"found in top {k}", f"recall@{k}", "AP"],
                    [[s["retrieval_slides"], fmt(s["topk_found_mean"], 2), fmt(s["recall_at_k_mean"]),
                      fmt(s["retrieval_ap_mean"])]])]
  else:
    md.append("No cell annotations on the test slides (`data.cell_labels_csv`): rankings and galleries only, "
              "no retrieval metrics.\n")
  md += ["## Test slides\n", md_table(["slide", "cells", "label", "called"] + [f"p({n})" for n in labels],
                                      slide_rows(test, labels, True)),
         "## Top cells per slide\n"]
  md += [f"![{t['id']}]({g})\n" for t, g in zip(test, galleries)]
  md.append("\nPer-cell attention and ranks: `cells.csv`. Machine-readable summary: `summary.json`.\n")
  return "\n".join(md)


def run(cfg: Any, workdir: str, manifest: dict[str, Any], out: str) -> None:
  """Writes the slide report under ``out`` (``summary.json`` last)."""
  t0 = time.perf_counter()
  labels = list(manifest["labels"])
  test = _load_test(workdir, manifest)
  probs = np.stack([np.asarray(s["probs"], np.float64) for s in test])
  cm = metrics.class_metrics([int(s["label"]) for s in test], probs, len(labels))
  per = _retrieval(test, labels, set(manifest.get("negative_labels") or []), int(cfg.report.topk))
  summary = _summary(cfg, workdir, manifest, test, cm, per)
  summary.update(uncertainty.summary_fields([int(s["label"]) for s in test], probs))  # AUC interval, Brier, reliability
  summary["cells_csv_rows"] = cells_csv.write_slide_cells_csv(os.path.join(out, "cells.csv"), test, labels,
                                                              with_truth=True)
  summary["galleries"] = gallery.write_galleries(os.path.join(out, "gallery"), manifest["root"], test, labels,
                                                 int(cfg.report.gallery_max_cells))
  summary["report_html"] = os.path.basename(report_html.write(  # the review page
      os.path.join(out, "report.html"), manifest["root"], test, labels, summary=summary,
      max_cells=int(cfg.report.gallery_max_cells),
      title=f"Test slides: {cfg.pretrain.method}, {summary['split_from']}, seed {cfg.seed}"))
  md = _markdown(summary, test, cm, summary["galleries"])
  summary["report_wall_s"] = time.perf_counter() - t0
  fileio.write_text(os.path.join(out, "report.md"), md)
  fileio.write_json(os.path.join(out, "summary.json"), metrics.json_safe(summary))
  logging.info("report: %d test slides, accuracy %s, macro F1 %s, macro AUC %s -> %s", len(test),
               fmt(cm["accuracy"]), fmt(cm["macro_f1"]), fmt(cm["macro_auc"]), out)
