r"""Fold ensembles: the K fold models of one cross-validation root act as one model in ``predict``.

  python -m slamags_jax.predict --workdir=<cv root> --slides=<folder> --out=<dir>

A cross-validation root is what ``launch/folds.py`` writes: ``<root>/fold<i>/``, each a
run's workdir with a trained MIL. Every fold model (its own encoder, MIL checkpoint and
input standardisation) embeds and scores every slide; the ensemble's class
probabilities are the mean of the K folds' probabilities, its call their argmax, and its
per-cell attention the mean of the folds' attention (each sums to 1 over the slide, so
the mean does too). ``predictions.csv`` keeps each fold's probabilities beside the mean
(``fold<i>_p_<label>``) and their spread (``sd_p_<label>``, population std over folds): a
slide the folds disagree on is one to look at. The folds must share their labels.
A fold's workdir passed alone still predicts alone.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from slamags_jax.runtime.errors import UserError

_FOLD = re.compile(r"^fold(\d+)$")


def fold_workdirs(root: str) -> list[str]:
  """``root``'s ``fold<i>`` sub-folders in fold order when ``root`` is a CV root (no MIL of its own), else []."""
  if not os.path.isdir(root) or os.path.exists(os.path.join(root, "mil", "summary.json")):
    return []
  found = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _FOLD.match(name))
                 and os.path.isdir(os.path.join(root, name)))
  return [os.path.join(root, name) for _, name in found]


def is_cv_root(root: str) -> bool:
  return bool(fold_workdirs(root))


def combine(per_fold: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """Mean class probabilities and attention over folds (slides matched by id)."""
  ids = [s["id"] for s in per_fold[0]]
  out = []
  for j, sid in enumerate(ids):
    parts = [fold[j] for fold in per_fold]
    if any(p["id"] != sid for p in parts):
      raise UserError(f"fold models scored different slides (slide {sid!r}): the slides folder changed "
                      "while predicting")
    probs = np.stack([np.asarray(p["probs"], np.float64) for p in parts])
    mean = probs.mean(axis=0)
    att = np.mean([np.asarray(p["attention"], np.float64) for p in parts], axis=0)
    branches = np.mean([np.asarray(p["attention_branches"], np.float64) for p in parts], axis=0)
    out.append({**parts[0], "probs": mean, "pred": int(np.argmax(mean)), "attention": att,
                "attention_branches": branches, "fold_probs": probs, "sd": probs.std(axis=0)})
  return out


def predict_cv_root(root: str, slides_root: str, out: str, score_fn, write_fn) -> dict[str, Any]:
  """Scores every slide with every fold (``score_fn(workdir) -> (scored, labels, meta, wall_s, skipped)``),
  combines them and writes with ``write_fn(scored, labels, info)``; returns predict's summary."""
  folds = fold_workdirs(root)
  trained = [f for f in folds if os.path.exists(os.path.join(f, "mil", "summary.json"))]
  missing = [os.path.basename(f) for f in folds if f not in trained]
  if missing:
    raise UserError(f"--workdir {root} is a cross-validation root, but {', '.join(missing)} has no trained MIL "
                    "(finish the folds with launch/folds.py, or pass one fold's workdir)")
  per_fold, labels, wall, skipped, metas = [], None, 0.0, [], []
  for f in trained:
    scored, fold_labels, meta, w, sk = score_fn(f)
    if labels is not None and fold_labels != labels:
      raise UserError(f"the folds of {root} have different labels ({labels} vs {fold_labels} in {f})")
    labels = fold_labels
    per_fold.append(sorted(scored, key=lambda s: s["id"]))
    metas.append(meta)
    wall += w
    skipped = sk
  scored = combine(per_fold)
  info = {"folds": [os.path.basename(f) for f in trained], "metas": metas, "wall_s": wall, "skipped": skipped}
  write_fn(scored, labels, info)
  return {"slides": len(scored), "cells": sum(len(s["attention"]) for s in scored), "wall_s": wall,
          "skipped": skipped, "folds": len(trained)}
