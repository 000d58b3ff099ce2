"""The ``bags`` stage: one manifest of cells and bags, written from a bag source.

A bag source turns the data into cells (relative image paths under ``root``) and bags
(lists of cell ids with a split and a label). Two sources, one module each, behind one
small interface (``check(cfg)``: what can be refused before any work; ``build(cfg,
workdir)``: the manifest's content):

- ``bags.source=simulated`` (``slamags_jax.bags.simulated``): the benchmark's bags drawn
  from cell-class folders (PBC-ERB);
- ``bags.source=slides`` (``slamags_jax.bags.slides``): a user's slides, one folder of
  single-cell images per slide, labelled by a CSV, split by the CSV or by patient-level
  folds.

Every later stage reads only the manifest, through the accessors below: a bag's
``label`` is its class index (0/1 for simulated bags; the index into ``labels`` for
slides) and ``positive`` says whether SLAM pretraining treats it as positive (not
normal). The stage writes ``<workdir>/bags/manifest.json`` atomically and last (it is
the stage's completion marker).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

# The simulation's functions stay importable from here (other modules and tests use them).
from slamags_jax.bags.simulated import settings_from_config, simulate, split_class, witnesses_per_bag  # noqa: F401
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

FORMAT = "slamags-bags/1"
MANIFEST = os.path.join("bags", "manifest.json")
SPLITS = ("train", "val", "test")
SOURCES = ("simulated", "slides")


def source_module(cfg: Any):
  """The module of the bag source named by ``bags.source``."""
  source = cfg.bags.source
  if source == "simulated":
    from slamags_jax.bags import simulated as bags_simulated
    return bags_simulated
  if source == "slides":
    from slamags_jax.bags import slides as bags_slides
    return bags_slides
  raise UserError(f"config key 'bags.source' must be one of {', '.join(SOURCES)}, got {source!r}")


def check(cfg: Any) -> None:
  """Refuses bad data settings before any work (``main`` calls it before creating the workdir)."""
  source_module(cfg).check(cfg)


def run(cfg: Any, workdir: str) -> None:
  """The ``bags`` stage: the source builds the manifest, this writes it (last).

  With several processes (multi-host), process 0 does the stage (it writes: the TFDS
  records when it prepares them, the manifest) and the others wait for it; no stage
  computation is collective here.
  """
  from slamags_jax.runtime import parallel  # jax only when the stage runs
  # Every process decided to run this stage before process 0 can complete it (writing the
  # stage's marker): a process that checked later would skip it and miss the barriers.
  parallel.sync("bags: start")
  if not parallel.is_writer():
    parallel.sync("bags: manifest written")
    return
  t0 = time.time()
  manifest = {"format": FORMAT, **source_module(cfg).build(cfg, workdir)}
  path = os.path.join(workdir, MANIFEST)
  # Slide sets reach a million cells: written without indentation (a third of the size).
  fileio.write_json(path, manifest, compact=manifest.get("source") == "slides")  # last: the marker
  logging.info("bags: wrote %s in %.1f s", path, time.time() - t0)
  parallel.sync("bags: manifest written")


def load_manifest(workdir: str) -> dict[str, Any]:
  """Reads ``<workdir>/bags/manifest.json``; ``UserError`` when the bags stage has not run."""
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: run the bags stage first (--config.stages=bags,...)")
  manifest = fileio.read_json(path)
  if manifest.get("format") != FORMAT:
    raise UserError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
  return manifest


def bags_of(manifest: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
  """The bags of one split ("train", "val" or "test"), in manifest order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return [b for b in manifest["bags"] if b["split"] == split]


def bag_cells(manifest: Mapping[str, Any], split: str) -> list[np.ndarray]:
  """Cell ids (int64, bag order) of each bag of ``split``."""
  return [np.asarray(b["cells"], np.int64) for b in bags_of(manifest, split)]


def bag_labels(manifest: Mapping[str, Any], split: str) -> np.ndarray:
  """Bag labels (class indices, int32) of ``split``, in manifest order."""
  return np.asarray([b["label"] for b in bags_of(manifest, split)], np.int32)


def cell_labels(manifest: Mapping[str, Any]) -> dict[int, int]:
  """Cell id -> instance label (1 = abnormal)."""
  return {c["id"]: c["label"] for c in manifest["cells"]}


def cells_by_id(manifest: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
  """Cell id -> its manifest entry."""
  return {c["id"]: c for c in manifest["cells"]}


def used_cell_ids(manifest: Mapping[str, Any]) -> np.ndarray:
  """Sorted unique ids of every cell referenced by any bag."""
  ids = {c for b in manifest["bags"] for c in b["cells"]}
  return np.array(sorted(ids), np.int64)


def is_positive(bag: Mapping[str, Any]) -> bool:
  """Whether SLAM pretraining treats ``bag`` as positive: simulated label 1, or a slide label
  that is not one of ``data.negative_labels``."""
  return bool(bag.get("positive", bag["label"] == 1))


def label_names(manifest: Mapping[str, Any]) -> list[str]:
  """Class names by class index: the slide labels, or ["normal", "abnormal"] (simulated)."""
  return list(manifest.get("labels") or ["normal", "abnormal"])


def pretrain_pools(manifest: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(P, N): sorted unique cell ids of the positive and of the negative *train* bags.

  Only split "train": validation bags are kept out of pretraining so that MIL model
  selection on them stays clean (the encoder never saw their bag labels). A normal cell
  may be in both P and N when the simulation put it in a positive and a negative bag;
  that is what the bag labels say.
  """
  pos, neg = set(), set()
  for b in bags_of(manifest, "train"):
    (pos if is_positive(b) else neg).update(b["cells"])
  return np.array(sorted(pos), np.int64), np.array(sorted(neg), np.int64)
