"""Bag source ``simulated`` (``bags.source=simulated``): real cells, simulated slides.

The benchmark protocol (docs: PBC-ERB) turns a cell folder into bags:

1. Cell-level split, per class, fixed by the data seed: ``bags.train_fraction`` of each
   class's cells form the train pool, the rest the test pool. No cell is in both pools,
   so no test bag ever shares a cell image with a training bag.
2. From each pool, n/2 negative bags of ``bag_size`` normal cells and n/2 positive bags of
   k abnormal + (bag_size - k) normal cells, with k = max(1, round(bag_size x witness
   rate)) (round half up). Abnormal cells go only into positive bags; normal cells into
   both. Cells are distinct within a bag.
3. ``bags.val_fraction`` of the training bags (stratified by label) become validation
   bags for MIL model selection (this project's choice; the reference selects on training
   accuracy).

Reuse (where this project differs on purpose): the reference draws cells without reuse
across bags. Here each pool is consumed without replacement while it lasts; when it runs
out and ``bags.allow_reuse`` is true, drawing continues through a fresh shuffle of the
pool (still distinct within a bag, never across pools), and the manifest and log report
how many cells were used more than once. With reuse disallowed, running out is an error.

``build`` returns the manifest's content; ``slamags_jax.bags`` writes it. Every random choice
comes from ``config.data_seed(cfg)`` through
keyed ``np.random.default_rng([seed, stream, ...])`` generators, so the same seed gives
the same manifest byte for byte, and a class's train/test split does not depend on which
other classes are selected.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

from slamags_jax import config as config_lib
from slamags_jax.data import cells as data_lib
from slamags_jax.runtime.errors import UserError

SPLITS = ("train", "val", "test")

# Random streams (first words of the keyed seeds).
_SPLIT, _DRAW, _VAL, _ORDER = 1, 2, 3, 4


def _name_key(name: str) -> int:
  return zlib.crc32(name.encode("utf-8"))


def witnesses_per_bag(bag_size: int, witness_rate: float) -> int:
  """k = max(1, round(bag_size x witness_rate)), rounding halves up.

  Raises ``UserError`` for a witness rate outside (0, 1] or a bag size below 1.
  """
  if isinstance(witness_rate, bool) or not isinstance(witness_rate, (int, float)) or not math.isfinite(witness_rate):
    raise UserError(f"bags.witness_rate must be a number in (0, 1], got {witness_rate!r}")
  if not 0.0 < witness_rate <= 1.0:
    raise UserError("bags.witness_rate must be in (0, 1] (share of abnormal cells in a positive bag), "
                    f"got {witness_rate}")
  if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
    raise UserError(f"bags.bag_size must be an integer >= 1, got {bag_size!r}")
  # The 1e-9 absorbs float noise such as 200 * 0.005 = 1.0000000000000002.
  return max(1, min(bag_size, int(math.floor(bag_size * witness_rate + 0.5 + 1e-9))))


def split_class(paths: Sequence[str], train_fraction: float, seed: int, class_name: str) -> tuple[list[str], list[str]]:
  """(train, test) cells of one class: a seeded shuffle cut at round(n x train_fraction).

  Both parts get at least one cell when the class has two or more.
  """
  n = len(paths)
  rng = np.random.default_rng([seed, _SPLIT, _name_key(class_name)])
  order = rng.permutation(n)
  n_train = int(math.floor(n * train_fraction + 0.5))
  if n >= 2:
    n_train = min(max(n_train, 1), n - 1)
  train = sorted(paths[i] for i in order[:n_train])
  test = sorted(paths[i] for i in order[n_train:])
  return train, test


class _Cycler:
  """Draws cells from a pool without replacement; optionally reshuffles when it runs out."""

  def __init__(self, pool: np.ndarray, rng: np.random.Generator, allow_reuse: bool, what: str):
    self.pool = pool
    self.rng = rng
    self.allow_reuse = allow_reuse
    self.what = what
    self.order = rng.permutation(pool)
    self.pos = 0
    self.cycles = 1

  def take(self, m: int) -> np.ndarray:
    """``m`` distinct cells."""
    if m > len(self.pool):
      raise UserError(f"a bag needs {m} distinct {self.what} but the pool has only {len(self.pool)}")
    got = self.order[self.pos:self.pos + m]
    self.pos += len(got)
    if len(got) == m:
      return got
    if not self.allow_reuse:
      raise UserError(
          f"not enough {self.what}: the bags need more than the {len(self.pool)} in the pool "
          "(set bags.allow_reuse=True, or use fewer or smaller bags, or a larger bags.train_fraction)"
      )
    # A fresh cycle; cells already in this bag go to the back so the bag stays distinct.
    fresh = self.rng.permutation(self.pool)
    clash = np.isin(fresh, got)
    self.order = np.concatenate([fresh[~clash], fresh[clash]])
    self.cycles += 1
    rest = m - len(got)
    self.pos = rest
    return np.concatenate([got, self.order[:rest]])


def _reuse_stats(bags: Iterable[Sequence[int]], pool_size: int) -> dict[str, int]:
  counts: dict[int, int] = {}
  for cells in bags:
    for c in cells:
      counts[c] = counts.get(c, 0) + 1
  uses = np.fromiter(counts.values(), np.int64, len(counts))
  return {
      "pool_cells": int(pool_size),
      "distinct_used": int(len(counts)),
      "slots": int(uses.sum()) if len(uses) else 0,
      "reused_cells": int((uses > 1).sum()),
      "max_uses": int(uses.max()) if len(uses) else 0,
  }


def _check_settings(cells_by_class: Mapping[str, Sequence[str]], normal_classes: Sequence[str],
                    abnormal_classes: Sequence[str], n_train: int, n_test: int, train_fraction: float,
                    val_fraction: float) -> None:
  """Raises ``UserError`` for settings no pool can satisfy (counts, fractions, classes)."""
  for key, n in (("bags.n_train", n_train), ("bags.n_test", n_test)):
    if n < 2 or n % 2:
      raise UserError(f"{key} must be an even number >= 2 (half negative, half positive bags), got {n}")
  if not 0.0 < train_fraction < 1.0:
    raise UserError(f"bags.train_fraction must be in (0, 1), got {train_fraction}")
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"bags.val_fraction must be in [0, 1), got {val_fraction}")
  overlap = set(normal_classes) & set(abnormal_classes)
  if overlap:
    raise UserError(f"class {sorted(overlap)[0]!r} is both normal and abnormal")
  if not normal_classes or not abnormal_classes:
    raise UserError("at least one normal and one abnormal class are needed")
  for c in list(normal_classes) + list(abnormal_classes):
    if c not in cells_by_class or not cells_by_class[c]:
      raise UserError(f"class {c!r} has no readable images")


def _pool_cells(cells_by_class: Mapping[str, Sequence[str]], normal_classes: Sequence[str],
                abnormal_classes: Sequence[str], train_fraction: float, seed: int) -> list[dict[str, Any]]:
  """Cell-level split per class into the train and test pools; ids over all pool cells in (path) order."""
  entries = []
  for c in sorted(set(normal_classes) | set(abnormal_classes)):
    label = 1 if c in abnormal_classes else 0
    train, test = split_class(list(cells_by_class[c]), train_fraction, seed, c)
    entries += [(p, c, label, "train") for p in train] + [(p, c, label, "test") for p in test]
  entries.sort(key=lambda e: e[0])
  if len({e[0] for e in entries}) != len(entries):
    raise UserError("a cell path appears in two classes")
  return [{"id": i, "path": p, "class": c, "label": lab, "pool": pool} for i, (p, c, lab, pool) in enumerate(entries)]


def _check_pool(pool: str, n_normal: int, n_abnormal: int, n_half: int, bag_size: int, k: int,
                allow_reuse: bool) -> None:
  """Raises ``UserError`` when the pool's cells cannot fill its bags."""
  if bag_size > n_normal:
    raise UserError(
        f"bag larger than the pool: a negative bag needs {bag_size} distinct normal cells "
        f"but the {pool} pool has {n_normal} (lower bags.bag_size, or raise bags.train_fraction)"
    )
  if k > n_abnormal:
    raise UserError(
        f"fewer abnormal cells than needed: a positive bag needs k={k} but the {pool} pool "
        f"has {n_abnormal} abnormal cells"
    )
  need_abn = n_half * k
  if need_abn > n_abnormal and not allow_reuse:
    raise UserError(
        f"fewer abnormal cells than needed: {n_half} positive {pool} bags x k={k} need "
        f"{need_abn} distinct abnormal cells but the {pool} pool has {n_abnormal} "
        "(set bags.allow_reuse=True, lower bags.witness_rate or the bag count)"
    )
  need_norm = n_half * bag_size + n_half * (bag_size - k)
  if need_norm > n_normal and not allow_reuse:
    raise UserError(
        f"not enough normal cells: the {pool} bags need {need_norm} distinct normal cells "
        f"but the {pool} pool has {n_normal} (set bags.allow_reuse=True, or use fewer "
        "or smaller bags)"
    )


def _val_splits(drawn: Sequence[tuple[int, int, np.ndarray]], pool: str, val_fraction: float,
                seed: int) -> list[str]:
  """Each drawn bag's split: the pool's name, or ``val`` for a share of each label of the train pool."""
  splits = [pool] * len(drawn)
  if pool == "train" and val_fraction > 0:
    vrng = np.random.default_rng([seed, _VAL])
    for lab in (0, 1):
      members = [i for i, d in enumerate(drawn) if d[0] == lab]
      n_val = int(math.floor(len(members) * val_fraction + 0.5))
      if len(members) >= 2:
        n_val = min(max(n_val, 1), len(members) - 1)
      for i in vrng.choice(members, size=n_val, replace=False):
        splits[int(i)] = "val"
  return splits


def _pool_bags(pool: str, pool_idx: int, n_bags: int, normal: np.ndarray, abnormal: np.ndarray,
               labels: np.ndarray, *, bag_size: int, k: int, val_fraction: float, allow_reuse: bool,
               seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Draws one pool's bags (manifest entries) and its reuse statistics."""
  n_half = n_bags // 2
  _check_pool(pool, len(normal), len(abnormal), n_half, bag_size, k, allow_reuse)
  rng = np.random.default_rng([seed, _DRAW, pool_idx])
  norm_cyc = _Cycler(normal, rng, allow_reuse, f"normal cells in the {pool} pool")
  abn_cyc = _Cycler(abnormal, rng, allow_reuse, f"abnormal cells in the {pool} pool")
  drawn = []
  for _ in range(n_half):  # alternate negative / positive so any reuse is spread evenly
    neg = norm_cyc.take(bag_size)
    drawn.append((0, 0, rng.permutation(neg)))
    pos = np.concatenate([abn_cyc.take(k), norm_cyc.take(bag_size - k)])
    drawn.append((1, k, rng.permutation(pos)))
  # Listing order shuffled so that a bag's id says nothing about its label.
  order = np.random.default_rng([seed, _ORDER, pool_idx]).permutation(len(drawn))
  drawn = [drawn[i] for i in order]
  splits = _val_splits(drawn, pool, val_fraction, seed)
  bags = []
  counters = {s: 0 for s in SPLITS}
  for (lab, kk, members), split in zip(drawn, splits):
    bags.append({
        "id": f"{split}-{counters[split]:03d}",
        "split": split,
        "label": int(lab),
        "k": int(kk),
        "cells": [int(x) for x in members],
    })
    counters[split] += 1
  pool_bags = [d[2] for d in drawn]
  reuse = {
      "normal": _reuse_stats(
          [[int(x) for x in b if labels[x] == 0] for b in pool_bags], len(normal)),
      "abnormal": _reuse_stats(
          [[int(x) for x in b if labels[x] == 1] for b in pool_bags], len(abnormal)),
  }
  reuse["normal"]["cycles"] = norm_cyc.cycles
  reuse["abnormal"]["cycles"] = abn_cyc.cycles
  return bags, reuse


def simulate(
    cells_by_class: Mapping[str, Sequence[str]],
    normal_classes: Sequence[str],
    abnormal_classes: Sequence[str],
    *,
    bag_size: int,
    witness_rate: float,
    n_train: int,
    n_test: int,
    train_fraction: float,
    val_fraction: float,
    allow_reuse: bool,
    seed: int,
) -> dict[str, Any]:
  """The bag logic, without images: returns the manifest's "cells", "bags", "reuse".

  ``cells_by_class`` maps each class to the relative paths of its (readable) cells.
  Raises ``UserError`` for impossible settings: a witness rate outside (0, 1], an odd or
  too small bag count, a bag larger than its pool, too few abnormal cells without reuse.
  """
  k = witnesses_per_bag(bag_size, witness_rate)
  _check_settings(cells_by_class, normal_classes, abnormal_classes, n_train, n_test, train_fraction, val_fraction)
  cells = _pool_cells(cells_by_class, normal_classes, abnormal_classes, train_fraction, seed)
  ids = np.arange(len(cells))
  labels = np.array([c["label"] for c in cells], np.int64)
  pools = np.array([c["pool"] for c in cells])
  bags: list[dict[str, Any]] = []
  reuse: dict[str, Any] = {}
  for pool_idx, (pool, n_bags) in enumerate((("train", n_train), ("test", n_test))):
    normal = ids[(pools == pool) & (labels == 0)]
    abnormal = ids[(pools == pool) & (labels == 1)]
    pool_bags, reuse[pool] = _pool_bags(pool, pool_idx, n_bags, normal, abnormal, labels, bag_size=bag_size, k=k,
                                        val_fraction=val_fraction, allow_reuse=allow_reuse, seed=seed)
    bags += pool_bags
  return {"cells": cells, "bags": bags, "reuse": reuse, "k": k}


def settings_from_config(cfg: Any) -> dict[str, Any]:
  """The bags.* and data class settings that shape the manifest."""
  return {
      "normal_classes": config_lib.split_csv(cfg.data.normal_classes),
      "abnormal_classes": config_lib.split_csv(cfg.data.abnormal_classes),
      "bag_size": int(cfg.bags.bag_size),
      "witness_rate": float(cfg.bags.witness_rate),
      "n_train": int(cfg.bags.n_train),
      "n_test": int(cfg.bags.n_test),
      "train_fraction": float(cfg.bags.train_fraction),
      "val_fraction": float(cfg.bags.val_fraction),
      "allow_reuse": bool(cfg.bags.allow_reuse),
      "check_images": bool(cfg.data.check_images),
      "source": str(cfg.data.source),
  }


def _cells_from_tfds(cfg: Any, workdir: str, classes: Sequence[str]
                     ) -> tuple[str, dict[str, list[str]], dict[str, Any], list[dict[str, str]]]:
  """(root, class -> paths, TFDS info, skipped files) from the prepared ``cell_folder``.

  The dataset is prepared from ``data.root`` first when ``data_dir`` does not hold it
  yet; once prepared, ``data.root`` may be left empty.
  """
  from slamags_jax.data import tfds_cells  # TFDS only when used
  data_dir = tfds_cells.resolve_data_dir(cfg.data.tfds_data_dir, workdir)
  builder = tfds_cells.prepare(cfg.data.root, data_dir)
  index = tfds_cells.index(builder)
  root = builder.info.metadata.get("root") or os.path.abspath(cfg.data.root)
  available = sorted(index.classes)
  out = {}
  for c in classes:
    if c not in available:
      raise UserError(f"class {c!r} is not in the TFDS dataset at {data_dir!r}; classes there: {', '.join(available)}")
    paths = sorted(index.paths_of(c))
    if not paths:
      raise UserError(f"class {c!r} has no images in the TFDS dataset at {data_dir!r}")
    out[c] = paths
  info = {"data_dir": data_dir, "name": index.name, "records": index.records_by_path()}
  skipped = [{"path": p, "reason": r} for p, r in sorted(index.skipped) if p.split("/", 1)[0] in classes]
  return os.path.abspath(root), out, info, skipped


def check(cfg: Any) -> None:
  """What can be checked before any work: the data root and the class folders."""
  if cfg.data.source != "folder":
    return
  if not cfg.data.root:
    raise UserError("data.root is empty: set --config.data.root to a cell image folder")
  root = os.path.abspath(cfg.data.root)
  available = data_lib.class_folders(root)
  for c in config_lib.split_csv(cfg.data.normal_classes) + config_lib.split_csv(cfg.data.abnormal_classes):
    if c not in available:
      raise UserError(f"class {c!r} has no folder in data root {root!r}; class folders there: "
                      f"{', '.join(available) if available else 'none'}")


def build(cfg: Any, workdir: str) -> dict[str, Any]:
  """Discover, drop unreadable files, split, draw: the manifest's content (without ``format``)."""
  settings = settings_from_config(cfg)
  normal, abnormal = settings["normal_classes"], settings["abnormal_classes"]
  classes = normal + abnormal
  seed = int(config_lib.data_seed(cfg))
  # Refuse impossible settings before touching the data.
  witnesses_per_bag(settings["bag_size"], settings["witness_rate"])
  if not cfg.data.root and settings["source"] != "tfds":
    raise UserError("data.root is empty: set --config.data.root to a cell image folder")
  root = os.path.abspath(cfg.data.root) if cfg.data.root else ""

  tfds_info = None
  if settings["source"] == "tfds":
    root, by_class, tfds_info, excluded = _cells_from_tfds(cfg, workdir, classes)
    for e in excluded:
      logging.warning("bags: unreadable file %s was skipped when the TFDS dataset was prepared: %s",
                      e["path"], e["reason"])
    logging.info("bags: %d cells in the TFDS dataset %s; %d unreadable file(s) excluded",
                 sum(map(len, by_class.values())), tfds_info["data_dir"], len(excluded))
  else:
    by_class = data_lib.discover(root, classes)
    n_found = sum(map(len, by_class.values()))
    logging.info("bags: found %d images in %s (%s)", n_found, root,
                 ", ".join(f"{c}: {len(p)}" for c, p in by_class.items()))
    excluded = []
    if cfg.data.check_images:
      t1 = time.time()
      bad = data_lib.find_unreadable(root, [p for c in classes for p in by_class[c]])
      for path, reason in bad:
        logging.warning("bags: excluding unreadable file %s: %s", path, reason)
      logging.info("bags: checked %d images in %.1f s; %d unreadable file(s) excluded",
                   n_found, time.time() - t1, len(bad))
      bad_set = {p for p, _ in bad}
      by_class = {c: [p for p in ps if p not in bad_set] for c, ps in by_class.items()}
      excluded = [{"path": p, "reason": r} for p, r in sorted(bad)]
      for c, ps in by_class.items():
        if not ps:
          raise UserError(f"class {c!r} has no readable images in {os.path.join(root, c)!r}")

  sim = simulate(
      by_class, normal, abnormal,
      bag_size=settings["bag_size"], witness_rate=settings["witness_rate"],
      n_train=settings["n_train"], n_test=settings["n_test"],
      train_fraction=settings["train_fraction"], val_fraction=settings["val_fraction"],
      allow_reuse=settings["allow_reuse"], seed=seed,
  )
  settings["k"] = sim["k"]
  if tfds_info is not None:
    records = tfds_info.pop("records")
    for c in sim["cells"]:
      c["record"] = int(records[c["path"]])
  manifest = {
      "source": "simulated",
      "root": root,
      "seed": seed,
      "settings": settings,
      "excluded": excluded,
      "cells": sim["cells"],
      "bags": sim["bags"],
      "reuse": sim["reuse"],
  }
  if tfds_info is not None:
    manifest["tfds"] = tfds_info
  counts = {s: sum(b["split"] == s for b in sim["bags"]) for s in SPLITS}
  if settings["val_fraction"] > 0 and not counts["val"]:
    logging.warning("bags: bags.val_fraction=%g gave no validation bags (too few training bags)",
                    settings["val_fraction"])
  logging.info("bags: k=%d abnormal cells per positive bag of %d; %s bags (train/val/test)",
               sim["k"], settings["bag_size"], "/".join(str(counts[s]) for s in SPLITS))
  for pool, stats in sim["reuse"].items():
    for kind, st in stats.items():
      logging.info(
          "bags: %s pool, %s cells: %d in pool, %d used, %d used in more than one bag "
          "(max %d uses)", pool, kind, st["pool_cells"], st["distinct_used"],
          st["reused_cells"], st["max_uses"])
  return manifest
