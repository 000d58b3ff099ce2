r"""Applies a trained run to new slides: slide labels, per-cell attention, galleries.

  python -m slamags_jax.predict --workdir=<trained run> --slides=<folder> --out=<dir>

``--slides`` holds one folder per slide, ``<folder>/<slide_id>/**/<image>`` (the layout of
``bags.source=slides``; no labels and no CSV needed). The run's encoder
(``pretrain/encoder``), input settings (image and crop size, normalisation), MIL
checkpoint (``mil/checkpoints``, the selected epoch) and its input standardisation
embed and score every slide, streaming: each slide is scored as soon as its cells are
embedded (``embed.stream_bags``, batched, with a progress bar), so memory does not grow
with the number of slides. Scoring a run's own test slides reproduces its test
probabilities (``mil/predictions.npz``) to float rounding (test: 1e-6).

Writes under ``--out`` (each file atomically; ``report.md`` last):

- ``predictions.csv``: ``slide_id, cells, p_<label>`` for every label of the run, ``called``;
- ``cells.csv``: ``slide_id, path`` (relative to ``--slides``), attention per class
  (``attention_<label>``; ABMIL has one branch: ``attention``), ``rank`` in the slide by
  the ranking attention (the abnormal class's for two labels, the called label's for more);
- ``gallery/<slide_id>.png``: each slide's top-ranked cells;
- ``report.html``: the review page (``report/html.py``), self-contained;
- ``report.md``: the run, the counts per called label, the slide table, the galleries.

``--workdir`` may be a cross-validation root (``launch/folds.py``'s ``fold<i>/``): the K
fold models act as one, their class probabilities averaged (``slamags_jax/ensemble.py``;
``predictions.csv`` then also holds each fold's probabilities and their spread).

Bad input (a workdir without a trained MIL, no slide folders, a slide with fewer than
``--min_cells`` readable images) ends with one ``error:`` line and exit status 2 before
anything is written. Unreadable images are skipped and named in the log.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any

from absl import flags, logging

from slamags_jax import app
from slamags_jax import config as config_lib
from slamags_jax.runtime.errors import UserError

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program (``main`` defines ``--workdir`` too)."""
  _FLAGS.update(
      workdir=flags.DEFINE_string("workdir", None, "A run's workdir with a trained MIL (the mil stage complete), "
                                   "or a cross-validation root (fold<i>/ sub-folders: the fold ensemble)."),
      slides=flags.DEFINE_string("slides", None, "Folder with one sub-folder of single-cell images per slide."),
      out=flags.DEFINE_string("out", None, "Folder for the predictions (created if missing)."),
      min_cells=flags.DEFINE_integer("min_cells", None,
                                     "Fewest readable images per slide (default: the run's bags.min_cells)."),
      batch_size=flags.DEFINE_integer("batch_size", None,
                                      "Cells per embedding batch (default: the run's embed.batch_size)."),
      check_images=flags.DEFINE_bool(
          "check_images", None,
          "Decode every image first and skip unreadable ones (default: the run's data.check_images)."))


def run_config(workdir: str):
  """The run's config, rebuilt from ``<workdir>/config.json`` over the current defaults."""
  from slamags_jax.runtime import fileio
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"--workdir {workdir} has no config.json: not a run's workdir")
  flat = fileio.read_json(path)
  cfg = config_lib.get_base_config()
  for key, value in flat.items():
    if key not in config_lib.FIELDS_BY_KEY:
      continue
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return cfg


def check_trained(workdir: str) -> None:
  """``UserError`` unless ``workdir`` holds an encoder and a trained MIL."""
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} does not exist or is not a folder")
  for rel, what in (("mil/summary.json", "trained MIL"), ("mil/checkpoints", "MIL checkpoint"),
                    ("pretrain/encoder", "pretrained encoder"), ("embeddings/index.json", "embeddings")):
    if not os.path.exists(os.path.join(workdir, rel)):
      raise UserError(f"--workdir {workdir} has no {what} ({rel} missing): "
                      "run the pipeline through the mil stage first")


def plan_slides(slides_root: str, min_cells: int, check_images: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
  """(a manifest of the new slides, skipped files); ``UserError`` for no slides or too few cells."""
  from slamags_jax.bags import slides as bags_slides
  folders = bags_slides.slide_folders(slides_root, "--slides")
  if not folders:
    raise UserError(f"--slides {slides_root!r} has no slide folders (expected <slides>/<slide_id>/<images>)")
  images = bags_slides.list_slide_images(slides_root, folders)
  bags_slides.check_min_cells({s: len(p) for s, p in images.items()}, min_cells, readable=False)
  skipped: list[dict[str, str]] = []
  if check_images:
    images, skipped = bags_slides.drop_unreadable(slides_root, images)
    bags_slides.check_min_cells({s: len(p) for s, p in images.items()}, min_cells, readable=True)
  cells, bags = [], []
  for s in folders:
    first = len(cells)
    cells += [{"id": first + i, "path": p} for i, p in enumerate(images[s])]
    bags.append({"id": s, "split": "test", "label": 0, "k": 0, "cells": list(range(first, len(cells)))})
  return {"root": slides_root, "cells": cells, "bags": bags}, skipped


def predict_slides(workdir: str, slides_root: str, out: str, *, min_cells: int | None = None,
                   batch_size: int | None = None, check_images: bool | None = None) -> dict[str, Any]:
  """Checks everything, then embeds and scores every slide and writes ``out`` (see the module doc).

  ``workdir`` may be a cross-validation root (``fold<i>/`` sub-folders, as ``launch/folds.py``
  writes): its fold models act as one, their class probabilities averaged (``ensemble``).
  """
  from slamags_jax import ensemble
  workdir, slides_root, out = (os.path.abspath(p) for p in (workdir, slides_root, out))
  folds = ensemble.fold_workdirs(workdir)
  for w in folds or [workdir]:
    check_trained(w)
  cfg = run_config(folds[0] if folds else workdir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} exists and is not a folder")
  min_cells = int(cfg.bags.min_cells if min_cells is None else min_cells)
  if min_cells < 1:
    raise UserError(f"--min_cells must be >= 1, got {min_cells}")
  if batch_size is not None and batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {batch_size}")
  check = bool(cfg.data.check_images if check_images is None else check_images)
  manifest, skipped = plan_slides(slides_root, min_cells, check)
  os.makedirs(out, exist_ok=True)

  def write(scored: list[dict[str, Any]], labels: list[str], info: dict[str, Any]) -> None:
    _write_outputs(out, workdir, slides_root, cfg, scored, labels, info, skipped)

  if folds:
    return ensemble.predict_cv_root(workdir, slides_root, out, lambda w: (*_score(w, manifest, batch_size), skipped),
                                    write)
  scored, labels, meta, wall = _score(workdir, manifest, batch_size)
  write(scored, labels, {"metas": [meta], "wall_s": wall})
  n_cells = sum(len(s["attention"]) for s in scored)
  return {"slides": len(scored), "cells": n_cells, "wall_s": wall, "skipped": skipped}


def _score(workdir: str, manifest: dict[str, Any], batch_size: int | None) -> tuple[list[dict[str, Any]], list[str],
                                                                                    dict[str, Any], float]:
  """(scored slides sorted by id, labels, MIL meta, seconds): one run's encoder and MIL on every slide."""
  # The model stack only once the input is good.
  from slamags_jax import embed, mil, models
  from slamags_jax.mil.inference import with_temperature
  from slamags_jax.runtime import parallel
  cfg = run_config(workdir)
  params, meta = mil.load_checkpoint(workdir, "best")
  labels = list(meta.get("labels") or ["normal", "abnormal"])
  model = mil.model_from_meta(meta)
  forward = mil.make_forward(model)
  encoder = models.from_config(cfg)
  variables = embed.load_encoder_variables(cfg, workdir)
  mesh = parallel.data_mesh()
  t0 = time.perf_counter()
  scored = []
  for bag, embs in embed.stream_bags(manifest, cfg, encoder, variables, mesh, batch_size=batch_size):
    if embs.shape[1] != int(meta["input_dim"]):
      raise UserError(f"the encoder gives {embs.shape[1]}-dim embeddings, "
                      f"the MIL checkpoint expects {meta['input_dim']}")
    x = mil.prepare_inputs([{"id": bag["id"], "embeddings": embs}], meta)
    p = mil.predict(model, params, x, forward=forward)
    if meta.get("temperature"):  # mil.temperature_scaling: the run's calibrated probabilities
      p = with_temperature(p, meta["temperature"])
    scored.append({"id": bag["id"], "label": None, "pred": int(p["pred"][0]), "probs": p["probs"][0],
                   "attention": p["attention"][0], "attention_branches": p["attention_branches"][0],
                   "paths": [manifest["cells"][c]["path"] for c in bag["cells"]]})
  wall = time.perf_counter() - t0
  scored.sort(key=lambda s: s["id"])
  return scored, labels, meta, wall


def _write_outputs(out: str, workdir: str, slides_root: str, cfg: Any, scored: list[dict[str, Any]],
                   labels: list[str], info: dict[str, Any], skipped: list[dict[str, str]]) -> None:
  from slamags_jax.report import cells_csv, gallery, tables
  from slamags_jax.report import html as report_html
  from slamags_jax.runtime import fileio
  meta, wall = info["metas"][0], info["wall_s"]
  folds = info.get("folds") or []
  n_cells = sum(len(s["attention"]) for s in scored)
  with fileio.atomic_open(os.path.join(out, "predictions.csv"), "w") as f:
    w = csv.writer(f, lineterminator="\n")
    fold_cols = [f"{k}_p_{n}" for k in folds for n in labels] + [f"sd_p_{n}" for n in labels] if folds else []
    w.writerow(["slide_id", "cells"] + [f"p_{n}" for n in labels] + ["called"] + fold_cols)
    for s in scored:
      extra = ([f"{float(v):.10g}" for row in s["fold_probs"] for v in row] + [f"{float(v):.6g}" for v in s["sd"]]
               if folds else [])
      w.writerow([s["id"], len(s["attention"])] + [f"{float(v):.10g}" for v in s["probs"]] + [labels[s["pred"]]]
                 + extra)
  cells_csv.write_slide_cells_csv(os.path.join(out, "cells.csv"), scored, labels, with_truth=False)
  galleries = gallery.write_galleries(os.path.join(out, "gallery"), slides_root, scored, labels,
                                            int(cfg.report.gallery_max_cells))
  called = {n: sum(labels[s["pred"]] == n for s in scored) for n in labels}
  model_row = (["MIL", f"`{meta['model']}`, epoch {meta.get('epoch')} (the run's selected checkpoint)"] if not folds
               else ["MIL", f"fold ensemble of {len(folds)} ({', '.join(folds)}): mean class probabilities"])
  report_html.write(os.path.join(out, "report.html"), slides_root, scored, labels,
                    max_cells=int(cfg.report.gallery_max_cells),
                    title=f"Predictions: {len(scored)} slides" + (f", fold ensemble of {len(folds)}" if folds else ""),
                    notes=[f"Trained run: {workdir}", f"Slides: {slides_root}"])
  md = ["# Predictions\n",
        tables.md_table(["setting", "value"], [
            ["trained run", f"`{workdir}`"], ["slides", f"`{slides_root}`"], model_row,
            ["labels", ", ".join(labels)], ["slides / cells", f"{len(scored)} / {n_cells}"],
            ["unreadable images skipped", len(skipped)],
            ["embed + score time (s)", f"{wall:.1f} ({n_cells / max(wall, 1e-9):.0f} cells/s)"]]),
        "## Called labels\n", tables.md_table(labels, [[called[n] for n in labels]]),
        "## Slides\n", tables.md_table(["slide", "cells", "called"] + [f"p({n})" for n in labels],
                                      tables.slide_rows(scored, labels, False)),
        "## Top cells per slide\n"]
  md += [f"![{s['id']}]({g})\n" for s, g in zip(scored, galleries)]
  if skipped:
    md.append("## Skipped (unreadable) images\n")
    md.append(tables.md_table(["path", "reason"], [[e["path"], e["reason"]] for e in skipped]))
  md.append("\nPer-slide probabilities: `predictions.csv`; per-cell attention and ranks: `cells.csv`; review page: "
            "`report.html`.\n")
  fileio.write_text(os.path.join(out, "report.md"), "\n".join(md))
  logging.info("predict: %d slides, %d cells in %.1f s (%.0f cells/s) -> %s", len(scored), n_cells, wall,
               n_cells / max(wall, 1e-9), out)


@app.guarded
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    app.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  for name, example in (("workdir", "--workdir=workdirs/demo"), ("slides", "--slides=new_slides"),
                        ("out", "--out=predictions")):
    if not _FLAGS[name].value:
      app.fail(f"--{name} is required, e.g. {example}")
  predict_slides(_FLAGS["workdir"].value, _FLAGS["slides"].value, _FLAGS["out"].value,
                 min_cells=_FLAGS["min_cells"].value, batch_size=_FLAGS["batch_size"].value,
                 check_images=_FLAGS["check_images"].value)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
