"""Bag source ``slides`` (``bags.source=slides``): a user's own slides, one bag per slide.

Layout: ``data.root/<slide_id>/**/<image>`` (jpg, jpeg, png, bmp, tif, tiff; found
recursively, hidden files and folders skipped) and ``data.slides_csv`` with the columns
``slide_id,label`` and optionally ``patient_id`` (``case_id`` is read as its synonym, as
in CLAM's CSVs; default: the slide id) and ``split`` (``train``/``val``/``test``). Other
columns are ignored. Labels are strings; the class indices are ``data.negative_labels``
first (in the order given), then the other labels sorted.

Splits: the CSV's ``split`` column when it has one (a patient in two splits is an
error: it would leak); when it names no ``val`` slide, ``bags.val_fraction`` of the
training patients (stratified by label, grouped by patient) become validation slides,
and the log and the manifest's ``split_from`` say so. Otherwise ``bags.folds`` = K stratified folds at patient level
(sklearn ``StratifiedGroupKFold``, shuffled with the data seed): fold ``bags.fold`` is
the test split, and ``bags.val_fraction`` of the remaining patients (again stratified
and grouped) are validation slides; the rest train. Pretraining reads only the training
slides (``bags.pretrain_pools``); a slide is positive for it when its label is not one
of ``data.negative_labels``.

Optional ``data.cell_labels_csv`` (``path,label``, the path relative to ``data.root``):
annotated cells. A cell annotated with its slide's (non-negative) label is a witness of
that slide (manifest ``label`` 1) and the report computes retrieval metrics on the
slides that have annotated cells; without the file the report shows rankings only.

Everything that can be refused without decoding images (the CSVs, folders without rows
and rows without folders, duplicate ids, labels, splits, too few images) is checked by
``check`` before the run creates its workdir; ``build`` then decodes every image once
(``data.check_images``), skips and names unreadable ones, and refuses a slide left with
fewer than ``bags.min_cells`` readable images.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from slamags_jax import config as config_lib
from slamags_jax.data import cells as data_lib
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

SPLITS = ("train", "val", "test")
_FOLDS, _VAL = 21, 22  # first words of the keyed seeds (distinct streams of the data seed)
_CSV = 1 << 20  # the validation carve of a CSV split (a fold index never reaches it)


def _show(items: Sequence[Any], n: int = 6) -> str:
  """'a', 'b', 'c' and 4 more."""
  items = list(items)
  text = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:n])
  return text + (f" and {len(items) - n} more" if len(items) > n else "")


def _read_csv(path: str, what: str, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
  """(columns, [(line number, row)]) of a CSV with stripped names and values."""
  if not path:
    raise UserError(f"{what} is empty: name a CSV with columns {','.join(required)}")
  if not os.path.isfile(path):
    raise UserError(f"{what} {path!r} {'is not a file' if os.path.exists(path) else 'not found'}")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise UserError(f"{what} {path!r} is empty: it needs a header line {','.join(required)}")
      columns = [h.strip() for h in header]
      missing = [c for c in required if c not in columns]
      if missing:
        raise UserError(f"{what} {path!r} has no column {_show(missing)} (columns: {', '.join(columns)}); "
                        f"it needs {','.join(required)}")
      rows = []
      for values in reader:
        if not any(v.strip() for v in values):
          continue  # blank line
        if len(values) > len(columns):
          raise UserError(f"{what} {path!r} line {reader.line_num} has {len(values)} fields, the header {len(columns)}")
        rows.append((reader.line_num, {c: (values[i].strip() if i < len(values) else "")
                                       for i, c in enumerate(columns)}))
  except UnicodeDecodeError as e:
    raise UserError(f"{what} {path!r} is not UTF-8 text: {e.reason}") from e
  except csv.Error as e:
    raise UserError(f"{what} {path!r} is not a readable CSV: {e}") from e
  return columns, rows


@dataclasses.dataclass(frozen=True)
class Slide:
  slide_id: str
  label: str
  patient_id: str
  split: str  # "" until assigned
  line: int  # CSV line


def read_slides_csv(path: str) -> tuple[list[Slide], bool]:
  """(slides in CSV order, whether the CSV has a ``split`` column); ``UserError`` on bad rows."""
  what = "data.slides_csv"
  columns, rows = _read_csv(path, what, ("slide_id", "label"))
  patient_col = "patient_id" if "patient_id" in columns else ("case_id" if "case_id" in columns else None)
  has_split = "split" in columns
  if not rows:
    raise UserError(f"{what} {path!r} has no rows")
  empty = [line for line, r in rows if not r["slide_id"] or not r["label"]]
  if empty:
    raise UserError(f"{what} {path!r}: empty slide_id or label on line(s) {_show(empty)}")
  bad_id = [r["slide_id"] for _, r in rows if "/" in r["slide_id"] or "\\" in r["slide_id"]
            or r["slide_id"] in (".", "..")]
  if bad_id:
    raise UserError(f"{what} {path!r}: slide_id must be a folder name under data.root, got {_show(bad_id)}")
  seen: dict[str, int] = {}
  dup: dict[str, list[int]] = {}
  for line, r in rows:
    if r["slide_id"] in seen:
      dup.setdefault(r["slide_id"], [seen[r["slide_id"]]]).append(line)
    seen.setdefault(r["slide_id"], line)
  if dup:
    raise UserError(f"{what} {path!r}: duplicate slide ids: "
                    + "; ".join(f"{s!r} on lines {', '.join(map(str, ls))}" for s, ls in list(dup.items())[:6])
                    + (f" and {len(dup) - 6} more" if len(dup) > 6 else ""))
  if has_split:
    bad = [line for line, r in rows if r["split"].lower() not in SPLITS]
    if bad:
      raise UserError(f"{what} {path!r}: split must be train, val or test on every row; "
                      f"not on line(s) {_show(bad)}")
  slides = [Slide(r["slide_id"], r["label"], (r.get(patient_col) if patient_col else "") or r["slide_id"],
                  r["split"].lower() if has_split else "", line) for line, r in rows]
  return slides, has_split


def slide_folders(root: str, what: str = "data.root") -> list[str]:
  """Sorted names of the (non-hidden) folders directly under ``root``."""
  if not root:
    raise UserError(f"{what} is empty: name the folder that holds one sub-folder per slide")
  if not os.path.isdir(root):
    raise UserError(f"{what} {root!r} does not exist or is not a folder")
  return data_lib.class_folders(root)


def list_slide_images(root: str, slide_ids: Sequence[str]) -> dict[str, list[str]]:
  """Slide id -> sorted relative paths of its image files (recursively)."""
  return {s: data_lib.images_below(os.path.join(root, s), root) for s in slide_ids}


def check_min_cells(counts: Mapping[str, int], min_cells: int, readable: bool) -> None:
  """``UserError`` naming the slides with fewer than ``min_cells`` (readable) images."""
  few = [(s, n) for s, n in counts.items() if n < min_cells]
  if few:
    kind = "readable images" if readable else "image files"
    raise UserError(f"{len(few)} slide(s) have fewer than bags.min_cells={min_cells} {kind}: "
                    + ", ".join(f"{s!r} ({n})" for s, n in few[:6])
                    + (f" and {len(few) - 6} more" if len(few) > 6 else ""))


def drop_unreadable(root: str, images: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
  """Decodes every image once; (images without the unreadable ones, [{path, reason}])."""
  t0 = time.time()
  every = [p for ps in images.values() for p in ps]
  bad = data_lib.find_unreadable(root, every)
  for path, reason in bad:
    logging.warning("bags: skipping unreadable file %s: %s", path, reason)
  logging.info("bags: checked %d images in %.1f s; %d unreadable file(s) skipped", len(every),
               time.time() - t0, len(bad))
  bad_set = {p for p, _ in bad}
  kept = {s: [p for p in ps if p not in bad_set] for s, ps in images.items()}
  return kept, [{"path": p, "reason": r} for p, r in sorted(bad)]


def label_order(labels: Sequence[str], negative: Sequence[str]) -> list[str]:
  """Class names by index: the negative labels (in the given order), then the others sorted."""
  present = set(labels)
  return [n for n in negative if n in present] + sorted(present - set(negative))


def _keyed_state(seed: int, stream: int, *more: int) -> int:
  return int(np.random.default_rng([seed, stream, *more]).integers(2**31 - 1))


def carve_validation(split: np.ndarray, y: np.ndarray, groups: np.ndarray, rest: np.ndarray, val_fraction: float,
                     random_state: int) -> int:
  """Marks about ``val_fraction`` of the patients of ``rest`` (indices into ``split``) ``"val"``, in place.

  Stratified by label and grouped by patient (sklearn ``StratifiedGroupKFold`` with
  round(1 / val_fraction) splits; one of its held-out parts, the first that leaves every
  label of ``rest`` in training). Returns the number of validation slides (0, with a
  warning, when the patients are too few or no carve keeps every label in training).
  """
  from sklearn.model_selection import StratifiedGroupKFold
  rest = np.asarray(rest, np.int64)
  if val_fraction <= 0 or len(rest) == 0:
    return 0
  n_rest_groups = len(set(groups[rest].tolist()))
  n_val = int(round(1.0 / val_fraction))
  n_val = min(n_val, n_rest_groups, int(np.bincount(y[rest]).max()))
  if n_val < 2:
    logging.warning("bags: too few training patients (%d) for validation slides (bags.val_fraction=%g); MIL needs "
                    "mil.selection=last_epoch", n_rest_groups, val_fraction)
    return 0
  with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits"
    warnings.simplefilter("ignore", UserWarning)
    inner = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=random_state)
    # The first carve that leaves every training label in train (small sets can fail that).
    need = set(y[rest].tolist())
    for keep, val in inner.split(np.zeros(len(rest)), y[rest], groups[rest]):
      if set(y[rest][keep].tolist()) == need:
        split[rest[val]] = "val"
        return int(len(val))
  logging.warning("bags: no validation carve keeps every label in training; no validation slides")
  return 0


def fold_splits(labels: Sequence[int], patients: Sequence[str], folds: int, fold: int,
                val_fraction: float, seed: int) -> list[str]:
  """Per slide: train / val / test of fold ``fold`` of ``folds`` (see the module docstring)."""
  from sklearn.model_selection import StratifiedGroupKFold
  y = np.asarray(labels, np.int64)
  groups = np.asarray(patients)
  n_groups = len(set(patients))
  if n_groups < folds:
    raise UserError(f"bags.folds={folds} needs at least {folds} patients; data.slides_csv has {n_groups} "
                    "(lower bags.folds, or give a split column)")
  if folds > np.bincount(y).max():
    raise UserError(f"bags.folds={folds} is more than the slides of any one label ({np.bincount(y).max()}): "
                    "lower bags.folds, or give a split column")
  with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits"
    warnings.simplefilter("ignore", UserWarning)
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=_keyed_state(seed, _FOLDS))
    rest, test = list(outer.split(np.zeros(len(y)), y, groups))[fold]
    split = np.full(len(y), "train", dtype=object)
    split[test] = "test"
  carve_validation(split, y, groups, rest, val_fraction, _keyed_state(seed, _VAL, fold))
  return [str(s) for s in split]


def _carve_csv_validation(slides: list[Slide], index: dict[str, int], cfg: Any) -> tuple[list[Slide], int]:
  """A CSV split with train/test only: ``bags.val_fraction`` of the training patients become ``val``."""
  split = np.asarray([s.split for s in slides], dtype=object)
  y = np.asarray([index[s.label] for s in slides], np.int64)
  groups = np.asarray([s.patient_id for s in slides])
  rest = np.flatnonzero(split == "train")
  n_val = carve_validation(split, y, groups, rest, float(cfg.bags.val_fraction),
                           _keyed_state(int(config_lib.data_seed(cfg)), _VAL, _CSV))
  return [dataclasses.replace(s, split=str(sp)) for s, sp in zip(slides, split)], n_val


@dataclasses.dataclass
class Plan:
  """What ``check`` found: slides (sorted by id) with their splits, labels and image files."""
  root: str
  slides: list[Slide]
  labels: list[str]
  negative: list[str]
  images: dict[str, list[str]]
  split_from: str
  cell_labels: dict[str, str]
  csv_sha256: str


def read_cell_labels(path: str, root: str, known: set[str]) -> dict[str, str]:
  """Relative image path -> annotated label, from ``data.cell_labels_csv`` (``path,label``)."""
  what = "data.cell_labels_csv"
  _, rows = _read_csv(path, what, ("path", "label"))
  out: dict[str, str] = {}
  empty, dup, unknown = [], [], []
  for line, r in rows:
    p = r["path"]
    if not p or not r["label"]:
      empty.append(line)
      continue
    if os.path.isabs(p):
      p = os.path.relpath(p, root)
    p = os.path.normpath(p).replace(os.sep, "/")
    if p in out:
      dup.append(p)
    elif p not in known:
      unknown.append(p)
    out[p] = r["label"]
  if empty:
    raise UserError(f"{what} {path!r}: empty path or label on line(s) {_show(empty)}")
  if dup:
    raise UserError(f"{what} {path!r}: cells annotated twice: {_show(dup)}")
  if unknown:
    raise UserError(f"{what} {path!r}: {len(unknown)} path(s) are not images of a listed slide under "
                    f"data.root ({root!r}): {_show(unknown)}")
  return out


def plan(cfg: Any) -> Plan:
  """Reads and checks the CSVs and the folders (no image is decoded); see the module docstring."""
  root = os.path.abspath(cfg.data.root) if cfg.data.root else ""
  folders = slide_folders(root)
  csv_path = os.path.abspath(cfg.data.slides_csv) if cfg.data.slides_csv else ""
  slides, has_split = read_slides_csv(csv_path)
  listed = {s.slide_id for s in slides}
  present = set(folders)
  missing = [s for s in slides if s.slide_id not in present]
  if missing:
    raise UserError(f"{len(missing)} row(s) of data.slides_csv have no folder in data.root {root!r}: "
                    + _show([f"{s.slide_id} (line {s.line})" for s in missing]))
  extra = [f for f in folders if f not in listed]
  if extra and not cfg.data.ignore_unlisted_slides:
    raise UserError(f"{len(extra)} folder(s) in data.root {root!r} have no row in data.slides_csv: {_show(extra)} "
                    "(add rows, move the folders away, or set data.ignore_unlisted_slides=True)")
  if extra:
    logging.warning("bags: ignoring %d folder(s) without a row in data.slides_csv: %s", len(extra), _show(extra))

  names = sorted({s.label for s in slides})
  if len(names) < 2:
    raise UserError(f"data.slides_csv has a single label ({names[0]!r}) in total: the MIL needs two or more")
  negative = config_lib.split_csv(cfg.data.negative_labels)
  if not negative:
    raise UserError("data.negative_labels is empty: name the normal slide label(s) (labels in data.slides_csv: "
                    f"{', '.join(names)})")
  unknown = [n for n in negative if n not in names]
  if unknown:
    raise UserError(f"data.negative_labels names {_show(unknown)}, which no slide has; labels in "
                    f"data.slides_csv: {', '.join(names)}")
  if set(names) <= set(negative):
    raise UserError("every label is in data.negative_labels: SLAM pretraining needs slides of a "
                    "non-negative label too")
  labels = label_order(names, negative)
  index = {n: i for i, n in enumerate(labels)}
  slides = sorted(slides, key=lambda s: s.slide_id)

  if has_split:
    split_from = "csv"
    by_patient: dict[str, set[str]] = {}
    for s in slides:
      by_patient.setdefault(s.patient_id, set()).add(s.split)
    leak = [p for p, sp in by_patient.items() if len(sp) > 1]
    if leak:
      raise UserError(f"data.slides_csv: patient(s) {_show(leak)} have slides in more than one split")
    if not any(s.split == "val" for s in slides) and float(cfg.bags.val_fraction) > 0:
      slides, n_val = _carve_csv_validation(slides, index, cfg)
      if n_val:
        split_from = f"csv; validation carved: {n_val} of the training slides (bags.val_fraction=" \
                     f"{float(cfg.bags.val_fraction):g}, stratified by label, by patient)"
        logging.info("bags: the slides CSV fixes no validation slides; %s", split_from[5:])
  else:
    split_from = f"fold {cfg.bags.fold} of {cfg.bags.folds}"
    splits = fold_splits([index[s.label] for s in slides], [s.patient_id for s in slides], int(cfg.bags.folds),
                         int(cfg.bags.fold), float(cfg.bags.val_fraction), int(config_lib.data_seed(cfg)))
    slides = [dataclasses.replace(s, split=sp) for s, sp in zip(slides, splits)]
  in_train = {s.label for s in slides if s.split == "train"}
  absent = [n for n in labels if n not in in_train]
  if absent:
    raise UserError(f"label(s) {_show(absent)} have no slide in the training split ({split_from}): the MIL "
                    "cannot learn them (give them training slides, or lower bags.folds)")

  images = list_slide_images(root, [s.slide_id for s in slides])
  check_min_cells({s: len(p) for s, p in images.items()}, int(cfg.bags.min_cells), readable=False)
  cell_labels = {}
  if cfg.data.cell_labels_csv:
    known = {p for ps in images.values() for p in ps}
    cell_labels = read_cell_labels(os.path.abspath(cfg.data.cell_labels_csv), root, known)
  return Plan(root, slides, labels, [n for n in labels if n in negative], images, split_from, cell_labels,
              fileio.sha256_file(csv_path))


def check(cfg: Any) -> None:
  """What ``main`` refuses before any work (everything but decoding the images)."""
  p = plan(cfg)
  if (not any(s.split == "val" for s in p.slides) and cfg.mil.selection != "last_epoch"
      and "mil" in config_lib.split_csv(cfg.stages)):
    raise UserError(f"no validation slides ({p.split_from}, bags.val_fraction={float(cfg.bags.val_fraction):g}) "
                    f"for MIL model selection (mil.selection={cfg.mil.selection}): raise bags.val_fraction, give a "
                    "`val` split in data.slides_csv, or set --config.mil.selection=last_epoch to use the last epoch")


def settings_from_config(cfg: Any) -> dict[str, Any]:
  """The config values that shape a slides manifest."""
  return {
      "slides_csv": os.path.abspath(cfg.data.slides_csv) if cfg.data.slides_csv else "",
      "cell_labels_csv": os.path.abspath(cfg.data.cell_labels_csv) if cfg.data.cell_labels_csv else "",
      "negative_labels": config_lib.split_csv(cfg.data.negative_labels),
      "ignore_unlisted_slides": bool(cfg.data.ignore_unlisted_slides),
      "folds": int(cfg.bags.folds), "fold": int(cfg.bags.fold),
      "val_fraction": float(cfg.bags.val_fraction), "min_cells": int(cfg.bags.min_cells),
      "check_images": bool(cfg.data.check_images),
  }


def build(cfg: Any, workdir: str) -> dict[str, Any]:
  """The manifest's content: one bag per slide, cells numbered slide by slide."""
  del workdir
  p = plan(cfg)
  images, excluded = p.images, []
  found = sum(map(len, images.values()))
  logging.info("bags: %d slides with %d images in %s", len(p.slides), found, p.root)
  if cfg.data.check_images:
    images, excluded = drop_unreadable(p.root, images)
    check_min_cells({s: len(ps) for s, ps in images.items()}, int(cfg.bags.min_cells), readable=True)
  index = {n: i for i, n in enumerate(p.labels)}
  negative = set(p.negative)
  cells: list[dict[str, Any]] = []
  bags: list[dict[str, Any]] = []
  for s in p.slides:
    positive = s.label not in negative
    first = len(cells)
    witnesses = 0
    for path in images[s.slide_id]:
      annotated = p.cell_labels.get(path, "")
      witness = int(positive and annotated == s.label)
      witnesses += witness
      cells.append({"id": len(cells), "path": path, "class": annotated, "label": witness})
    bags.append({"id": s.slide_id, "split": s.split, "label": index[s.label], "label_name": s.label,
                 "positive": int(positive), "patient_id": s.patient_id, "k": witnesses,
                 "cells": list(range(first, len(cells)))})
  counts = {sp: sum(b["split"] == sp for b in bags) for sp in SPLITS}
  logging.info("bags: %s slides (train/val/test, %s); labels %s", "/".join(str(counts[sp]) for sp in SPLITS),
               p.split_from, ", ".join(f"{n} ({sum(b['label_name'] == n for b in bags)})" for n in p.labels))
  settings = settings_from_config(cfg)
  settings["split_from"] = p.split_from
  return {
      "source": "slides",
      "root": p.root,
      "seed": int(config_lib.data_seed(cfg)),
      "settings": settings,
      "slides_csv_sha256": p.csv_sha256,
      "labels": p.labels,
      "negative_labels": p.negative,
      "annotated_cells": len(p.cell_labels),
      "excluded": excluded,
      "cells": cells,
      "bags": bags,
  }
