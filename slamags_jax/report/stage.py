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

Slide bags (``bags.source=slides``) get the slide report instead (``report.slides``).
Metric definitions (ties, K larger than a bag) are those of ``slamags_jax.metrics``.
Display order in the gallery and the CSV ranks break attention ties by the bag's
cell order (metrics do not depend on that order).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import logging

from slamags_jax import metrics
from slamags_jax.report import bags as bag_report
from slamags_jax.report import cells_csv, figures, gallery
from slamags_jax.report.tables import fmt
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError


def _read_json_if(path: str) -> dict[str, Any] | None:
  return fileio.read_json(path) if os.path.exists(path) else None


def _write_pictures(cfg: Any, workdir: str, out: str, manifest: dict[str, Any], test: Sequence[dict[str, Any]],
                    per_bag: Sequence[dict[str, Any]], title: str) -> dict[str, str]:
  """The gallery (when ``report.gallery_bags`` > 0), attention, ROC and pretraining pictures; name -> file."""
  k, method, wr = int(cfg.report.topk), cfg.pretrain.method, float(cfg.bags.witness_rate)
  pictures: dict[str, str] = {}
  if int(cfg.report.gallery_bags) > 0:
    chosen = gallery.choose_bags(per_bag, int(cfg.report.gallery_bags))
    by_id = {b["id"]: b for b in test}
    fileio.write_bytes(os.path.join(out, "topk_gallery.png"), gallery.bag_gallery_png(
        [by_id[per_bag[i]["bag"]] for i in chosen], [per_bag[i] for i in chosen], manifest["root"], k,
        int(cfg.report.gallery_max_cells), f"Top-{k} cells by abnormal-class attention  |  {title}",
        bag_report.abnormal_name(manifest)))
    pictures["topk_gallery"] = "topk_gallery.png"
  fileio.write_bytes(os.path.join(out, "attention_hist.png"), figures.png(figures.attention_figure(test, k, title)))
  pictures["attention_hist"] = "attention_hist.png"
  fileio.write_bytes(os.path.join(out, "roc.png"), figures.png(figures.roc_figure(
      test, f"ROC of the {len(test)} test bags\n{title}")))
  pictures["roc"] = "roc.png"
  metrics_path = os.path.join(workdir, "pretrain", "metrics.jsonl")
  missing = None
  if not os.path.exists(metrics_path) and method != "random":
    missing = f"No pretraining curve: {metrics_path} not found."
  fileio.write_bytes(os.path.join(out, "pretrain_loss.png"), figures.png(figures.pretrain_figure(
      fileio.read_jsonl(metrics_path), method,
      f"Pretraining  |  {method} | witness rate {100 * wr:g}% | seed {cfg.seed}", missing)))
  pictures["pretrain_loss"] = "pretrain_loss.png"
  return pictures


def write_bag_report(cfg: Any, workdir: str, manifest: dict[str, Any], out: str) -> None:
  """Writes the simulated-bags report under ``out`` (``summary.json`` last)."""
  from slamags_jax import mil as mil_lib
  t0 = time.perf_counter()
  mil_summary = _read_json_if(os.path.join(workdir, "mil", "summary.json"))
  if mil_summary is None:
    raise UserError(f"{os.path.join(workdir, 'mil', 'summary.json')} not found: run the mil stage first")
  predictions = bag_report.join(mil_lib.load_predictions(workdir), manifest)
  test = [b for b in predictions if b["split"] == "test"]
  if not test:
    raise UserError("no test bags in the MIL predictions")
  k = int(cfg.report.topk)
  ev = bag_report.evaluate(test, k)
  summary = bag_report.summarize_test(cfg, manifest, mil_summary, test, ev, k)
  summary.update(bag_report.summarize_val([b for b in predictions if b["split"] == "val"], k))
  summary.update(bag_report.summarize_pretrain(
      _read_json_if(os.path.join(workdir, "pretrain", "summary.json")) or {}))

  n_rows = cells_csv.write_bag_cells_csv(os.path.join(out, "cells.csv"), test)
  title = (f"{cfg.pretrain.method} | witness rate {100 * float(cfg.bags.witness_rate):g}% | seed {cfg.seed} | "
           f"MIL {summary['mil_model']}")
  pictures = _write_pictures(cfg, workdir, out, manifest, test, ev["per_bag"], title)
  summary["pictures"] = sorted(pictures.values())
  summary["cells_csv_rows"] = n_rows
  summary["report_wall_s"] = time.perf_counter() - t0
  fileio.write_text(os.path.join(out, "report.md"), bag_report.markdown(summary, ev["per_bag"], pictures))
  fileio.write_json(os.path.join(out, "summary.json"), metrics.json_safe(summary))
  bag, ret = ev["bag"], ev["retrieval"]
  logging.info("report: bag F1 %s AUC %s acc %s | top-%d found %s recall %s AP %s -> %s",
               fmt(bag["f1"]), fmt(bag["auc"]), fmt(bag["accuracy"]), k, fmt(ret["topk_found_mean"], 2),
               fmt(ret["recall_at_k_mean"]), fmt(ret["average_precision_mean"]), out)


def run(cfg: Any, workdir: str) -> None:
  """The ``report`` stage (see the module docstring).

  With several processes (multi-host), process 0 writes the report and the others wait
  for it (nothing here is a collective computation).
  """
  from slamags_jax import bags as bags_lib
  from slamags_jax.runtime import parallel
  # Every process decided to run this stage before process 0 can complete it (writing the
  # stage's marker): a process that checked later would skip it and miss the barriers.
  parallel.sync("report: start")
  if not parallel.is_writer():
    parallel.sync("report: written")
    return
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  marker = os.path.join(out, "summary.json")
  if os.path.exists(marker):
    os.unlink(marker)
  manifest = bags_lib.load_manifest(workdir)
  if manifest.get("source") == "slides":  # the user's slides: per-class metrics, no simulation
    from slamags_jax.report import slides
    slides.run(cfg, workdir, manifest, out)
  else:
    write_bag_report(cfg, workdir, manifest, out)
  parallel.sync("report: written")

