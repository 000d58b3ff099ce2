"""Bag simulation: k per bag, the train/test split, impossible settings, the manifest."""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from slamags_jax import bags
from slamags_jax import config as config_lib
from slamags_jax.runtime.errors import UserError

BENCHMARK = [(0.1, 20), (0.05, 10), (0.02, 4), (0.01, 2), (0.005, 1)]


def _table(n_normal=(900, 600), n_abnormal=400):
  """A synthetic cell table: class -> paths (no images needed for the bag logic)."""
  out = {f"n{i}": [f"n{i}/{j:05d}.jpg" for j in range(n)] for i, n in enumerate(n_normal)}
  out["abn"] = [f"abn/{j:05d}.jpg" for j in range(n_abnormal)]
  return out


def _simulate(table=None, **kw):
  args = dict(bag_size=200, witness_rate=0.1, n_train=20, n_test=20, train_fraction=0.6,
              val_fraction=0.2, allow_reuse=True, seed=0)
  args.update(kw)
  table = table or _table()
  normal = sorted(c for c in table if c != "abn")
  return bags.simulate(table, normal, ["abn"], **args)


@pytest.mark.parametrize("wr,k", BENCHMARK)
def test_positives_per_bag_equal_k(wr, k):
  assert bags.witnesses_per_bag(200, wr) == k
  sim = _simulate(witness_rate=wr)
  assert sim["k"] == k
  label = {c["id"]: c["label"] for c in sim["cells"]}
  for b in sim["bags"]:
    assert len(b["cells"]) == 200 and len(set(b["cells"])) == 200  # distinct within a bag
    n_abn = sum(label[c] for c in b["cells"])
    assert n_abn == (k if b["label"] == 1 else 0)
    assert b["k"] == (k if b["label"] == 1 else 0)


def test_bag_counts_and_stratified_validation():
  sim = _simulate(n_train=20, n_test=12, val_fraction=0.2)
  count = Counter((b["split"], b["label"]) for b in sim["bags"])
  assert count == {("train", 0): 8, ("train", 1): 8, ("val", 0): 2, ("val", 1): 2,
                   ("test", 0): 6, ("test", 1): 6}
  ids = [b["id"] for b in sim["bags"]]
  assert len(set(ids)) == len(ids) and "val-000" in ids and "test-005" in ids
  # At least one validation bag per label even when the fraction rounds to zero.
  sim = _simulate(n_train=4, val_fraction=0.1)
  assert Counter((b["split"], b["label"]) for b in sim["bags"] if b["split"] == "val") == {("val", 0): 1, ("val", 1): 1}
  sim = _simulate(val_fraction=0.0)
  assert not [b for b in sim["bags"] if b["split"] == "val"]


def test_no_cell_crosses_the_split():
  table = _table()
  sim = _simulate(table)
  pool = {c["id"]: c["pool"] for c in sim["cells"]}
  paths = {c["id"]: c["path"] for c in sim["cells"]}
  for b in sim["bags"]:
    want = "test" if b["split"] == "test" else "train"
    assert {pool[c] for c in b["cells"]} == {want}
  train_paths = {paths[c] for b in sim["bags"] if b["split"] != "test" for c in b["cells"]}
  test_paths = {paths[c] for b in sim["bags"] if b["split"] == "test" for c in b["cells"]}
  assert train_paths and test_paths and not train_paths & test_paths
  # Per class: 60 % of the cells in the train pool.
  per_class = Counter((c["class"], c["pool"]) for c in sim["cells"])
  assert per_class[("n0", "train")] == 540 and per_class[("n0", "test")] == 360
  assert per_class[("abn", "train")] == 240
  # A class's split does not depend on the other classes chosen.
  train_n0, _ = bags.split_class(table["n0"], 0.6, 0, "n0")
  assert {c["path"] for c in sim["cells"] if c["class"] == "n0" and c["pool"] == "train"} == set(train_n0)


def test_reuse_is_reported_and_stays_in_the_pool():
  # Small pools: normal cells must be reused across bags; abnormal cells are not.
  sim = _simulate(_table((150, 150), 100), bag_size=50, witness_rate=0.1, n_train=10, n_test=10)
  r = sim["reuse"]["train"]["normal"]
  assert r["pool_cells"] == 180 and r["distinct_used"] == 180
  assert r["slots"] == 5 * 50 + 5 * 45 and r["reused_cells"] > 0 and r["max_uses"] >= 2
  assert sim["reuse"]["train"]["abnormal"]["reused_cells"] == 0
  # Large pools: no reuse at all.
  sim = _simulate(_table((3000, 3000), 400), bag_size=50, n_train=10, n_test=10, witness_rate=0.1)
  assert sim["reuse"]["train"]["normal"]["reused_cells"] == 0
  assert sim["reuse"]["train"]["normal"]["max_uses"] == 1


@pytest.mark.parametrize("wr", [0.0, -0.1, 1.5, float("nan")])
def test_bad_witness_rate_is_refused(wr):
  with pytest.raises(UserError, match="witness_rate"):
    _simulate(witness_rate=wr)


def test_bag_larger_than_the_pool():
  with pytest.raises(UserError, match="bag larger than the pool"):
    _simulate(_table((100, 100), 100), bag_size=150)


def test_fewer_abnormal_cells_than_needed():
  # 240 abnormal train cells; 10 positive bags x k=40 need 400.
  with pytest.raises(UserError, match="fewer abnormal cells than needed"):
    _simulate(witness_rate=0.2, allow_reuse=False)
  # With reuse allowed it works, and the reuse is reported.
  sim = _simulate(witness_rate=0.2, allow_reuse=True)
  assert sim["reuse"]["train"]["abnormal"]["reused_cells"] > 0
  # A single bag needing more witnesses than the pool holds fails even with reuse.
  with pytest.raises(UserError, match="fewer abnormal cells than needed"):
    _simulate(_table((900, 600), 10), witness_rate=0.1)
  # Normal cells running out without reuse is an error too.
  with pytest.raises(UserError, match="not enough normal cells"):
    _simulate(_table((150, 150), 200), bag_size=50, n_train=10, allow_reuse=False)


def test_odd_bag_count_is_refused():
  with pytest.raises(UserError, match="n_train"):
    _simulate(n_train=7)


def _folder(root, n=(12, 12, 10)):
  for cls, count in zip(("lym", "neu", "ery"), n):
    os.makedirs(root / cls / "sub", exist_ok=True)
    for i in range(count):
      arr = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(arr).save(root / cls / ("sub" if i % 2 else "") / f"{cls}_{i}.png")
  return root


def _cfg(root, **bag_kw):
  cfg = config_lib.get_base_config()
  cfg.data.root = str(root)
  cfg.data.normal_classes = "lym,neu"
  cfg.data.abnormal_classes = "ery"
  cfg.bags.bag_size = 6
  cfg.bags.witness_rate = 0.25
  cfg.bags.n_train = 4
  cfg.bags.n_test = 4
  for k, v in bag_kw.items():
    cfg.bags[k] = v
  return cfg


def test_run_excludes_broken_files_and_logs_them(tmp_path, caplog):
  root = _folder(tmp_path / "cells")
  (root / "lym" / "empty.jpg").write_bytes(b"")
  (root / "neu" / "sub" / "text.jpg").write_text("nope")
  good = open(root / "ery" / "ery_0.png", "rb").read()
  (root / "ery" / "cut.png").write_bytes(good[: len(good) // 2])
  with caplog.at_level(logging.INFO):
    bags.run(_cfg(root), str(tmp_path / "w"))
  m = bags.load_manifest(str(tmp_path / "w"))
  excluded = {e["path"] for e in m["excluded"]}
  assert excluded == {"lym/empty.jpg", "neu/sub/text.jpg", "ery/cut.png"}
  assert not excluded & {c["path"] for c in m["cells"]}
  text = caplog.text
  for p in excluded:
    assert p in text
  assert "3 unreadable file(s) excluded" in text
  assert m["format"] == "slamags-bags/1" and m["root"] == str(root)
  assert m["settings"]["k"] == 2 and set(m["reuse"]) == {"train", "test"}
  cell_ids = {c["id"] for c in m["cells"]}
  assert all(c in cell_ids for b in m["bags"] for c in b["cells"])


def test_manifest_is_deterministic(tmp_path):
  root = _folder(tmp_path / "cells")
  cfg = _cfg(root)
  bags.run(cfg, str(tmp_path / "a"))
  bags.run(cfg, str(tmp_path / "b"))
  a = (tmp_path / "a" / "bags" / "manifest.json").read_bytes()
  assert a == (tmp_path / "b" / "bags" / "manifest.json").read_bytes()
  cfg.data.seed = 7
  bags.run(cfg, str(tmp_path / "c"))
  assert a != (tmp_path / "c" / "bags" / "manifest.json").read_bytes()
  assert not [f for f in os.listdir(tmp_path / "a" / "bags") if f != "manifest.json"]  # no temp files left


def test_run_refuses_bad_settings_and_folders(tmp_path):
  root = _folder(tmp_path / "cells")
  with pytest.raises(UserError, match="witness_rate"):
    bags.run(_cfg(root, witness_rate=0.0), str(tmp_path / "w"))
  with pytest.raises(UserError, match="bag larger than the pool"):
    bags.run(_cfg(root, bag_size=40), str(tmp_path / "w"))
  with pytest.raises(UserError, match="does not exist"):
    bags.run(_cfg(tmp_path / "missing"), str(tmp_path / "w"))
  cfg = _cfg(root)
  cfg.data.abnormal_classes = "blast"
  with pytest.raises(UserError, match="'blast' has no folder"):
    bags.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "bags" / "manifest.json")
  with pytest.raises(UserError, match="run the bags stage"):
    bags.load_manifest(str(tmp_path / "w"))


def test_pretrain_pools_use_train_bags_only():
  sim = _simulate(_table((3000, 3000), 400), bag_size=50, n_train=10, n_test=10)
  m = {"cells": sim["cells"], "bags": sim["bags"]}
  pos, neg = bags.pretrain_pools(m)
  train_pos = {c for b in m["bags"] if b["split"] == "train" and b["label"] == 1 for c in b["cells"]}
  train_neg = {c for b in m["bags"] if b["split"] == "train" and b["label"] == 0 for c in b["cells"]}
  assert set(pos) == train_pos and set(neg) == train_neg
  assert list(pos) == sorted(pos) and pos.dtype == np.int64
  val = {c for b in m["bags"] if b["split"] == "val" for c in b["cells"]}
  assert val and not val & (set(pos) | set(neg))  # no reuse here, so disjoint
  assert len(bags.bag_cells(m, "test")) == 10 and set(bags.bag_labels(m, "val")) == {0, 1}
  assert set(bags.used_cell_ids(m)) == {c for b in m["bags"] for c in b["cells"]}
