"""Grain pipelines: batch composition, epochs, views, determinism, resume, sharding, embedding."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from slamags_jax import config as config_lib
from slamags_jax.data import augment
from slamags_jax.data import input_pipeline as ip
from slamags_jax.runtime.errors import UserError

N_POS, N_NEG = 24, 40  # |P|, |N|: with B = 16 -> 6 + 10 per step, 4 steps per epoch


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  root = tmp_path_factory.mktemp("cells")
  n_cells = N_POS + N_NEG + 8
  cells = []
  for i in range(n_cells):
    path = f"c{i % 3}/cell_{i:03d}.png"
    os.makedirs(root / os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / path)
    cells.append({"id": i, "path": path, "class": f"c{i % 3}", "label": 0, "pool": "train"})
  ids = list(range(n_cells))
  pos, neg, rest = ids[:N_POS], ids[N_POS:N_POS + N_NEG], ids[N_POS + N_NEG:]
  bags = (
      [{"id": f"train-{j:03d}", "split": "train", "label": 1, "k": 1, "cells": pos[j::2]} for j in range(2)]
      + [{"id": f"train-{2 + j:03d}", "split": "train", "label": 0, "k": 0, "cells": neg[j::4]} for j in range(4)]
      + [{"id": "val-000", "split": "val", "label": 1, "k": 1, "cells": rest[:4]},
         {"id": "test-000", "split": "test", "label": 0, "k": 0, "cells": rest[4:]}])
  return {"format": "slamags-bags/1", "root": str(root), "seed": 0, "cells": cells, "bags": bags}


def _cfg(epochs=3, batch=16, workers=0, pos_fraction=-1.0):
  cfg = config_lib.get_base_config()
  cfg.data.image_size = 16
  cfg.data.crop_size = 12
  cfg.data.workers = workers
  cfg.pretrain.epochs = epochs
  cfg.pretrain.batch_size = batch
  cfg.pretrain.pos_fraction = pos_fraction
  return cfg


def _all(it, n=None):
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_composition_and_epochs(manifest):
  d = ip.pretrain_data(manifest, _cfg(), seed=1)
  assert (d.pos_per_step, d.neg_per_step, d.steps_per_epoch, d.num_steps) == (6, 10, 4, 12)
  batches = _all(d.iterator())
  assert len(batches) == 12
  for b in batches:
    assert b["pos"].shape == (6, 2, 12, 12, 3) and b["neg"].shape == (10, 2, 12, 12, 3)
    assert b["pos"].dtype == np.uint8 and b["neg"].dtype == np.uint8
    assert b["pos_ids"].dtype == np.int32 and len(set(b["pos_ids"])) == 6
  orders = []
  for e in range(3):
    epoch = batches[4 * e:4 * e + 4]
    pos = np.concatenate([b["pos_ids"] for b in epoch])
    neg = np.concatenate([b["neg_ids"] for b in epoch])
    assert sorted(pos) == list(range(N_POS))  # every P patch exactly once per epoch
    assert sorted(neg) == list(range(N_POS, N_POS + N_NEG))
    orders.append(tuple(pos))
  assert len(set(orders)) == 3  # reshuffled every epoch


def test_proportional_split_rule():
  assert ip.split_batch(24, 40, 16) == (6, 10)
  assert ip.split_batch(1, 1000, 256) == (1, 255)  # clipped: both streams present
  assert ip.split_batch(1000, 1, 256) == (255, 1)
  assert ip.split_batch(30, 70, 256, pos_fraction=0.5) == (128, 128)
  assert ip.split_batch(24, 40, 16, process_count=2) == (6, 10)
  assert ip.split_batch(30, 70, 16, process_count=4) == (4, 12)  # multiples of 4
  assert ip.split_batch(30, 70, 16, process_count=2, multiple_of=4) == (4, 12)  # lcm(2, 4) = 4
  assert ip.split_batch(3296, 3251, 64, multiple_of=8) == (32, 32)
  with pytest.raises(UserError, match="too small"):
    ip.split_batch(24, 40, 8, multiple_of=8)
  with pytest.raises(UserError, match="divisible"):
    ip.split_batch(24, 40, 15, process_count=2)


def test_views(manifest):
  d = ip.pretrain_data(manifest, _cfg(epochs=1), seed=0)
  b = d.batch(0)
  centre = ip.center_crops(manifest, _cfg(), b["neg_ids"])
  np.testing.assert_array_equal(b["neg"][:, 0], centre)  # negative view 0 = centre crop
  assert not np.array_equal(b["neg"][:, 1], centre)
  assert not np.array_equal(b["pos"][:, 0], b["pos"][:, 1])
  strong = ip.pretrain_data(manifest, _cfg(epochs=1), seed=0, neg_center_view=False).batch(0)
  np.testing.assert_array_equal(strong["neg_ids"], b["neg_ids"])  # same patches, other views
  assert sum(np.array_equal(v, c) for v, c in zip(strong["neg"][:, 0], centre)) < 3


def test_seed_changes_batches(manifest):
  a = ip.pretrain_data(manifest, _cfg(epochs=1), seed=0).batch(0)
  b = ip.pretrain_data(manifest, _cfg(epochs=1), seed=1).batch(0)
  assert not np.array_equal(a["pos_ids"], b["pos_ids"])


def test_deterministic_across_workers_and_resume(manifest):
  ref = _all(ip.pretrain_data(manifest, _cfg(epochs=2), seed=3).iterator())
  assert len(ref) == 8  # 2 epochs of 4 steps: the comparisons below are not vacuous
  d2 = ip.pretrain_data(manifest, _cfg(epochs=2, workers=2), seed=3)
  it = d2.iterator()
  try:
    first = _all(it, 3)  # mid-epoch (4 steps per epoch)
    state = it.get_state()
  finally:
    it.close()
  assert_same_batches(first, ref[:3])
  it = d2.iterator()
  try:
    it.set_state(state)
    assert_same_batches(_all(it), ref[3:])
  finally:
    it.close()


def test_resume_in_process(manifest):
  d = ip.pretrain_data(manifest, _cfg(epochs=2), seed=5)
  ref = _all(d.iterator())
  assert len(ref) == 8
  it = d.iterator()
  assert len(_all(it, 6)) == 6
  state = it.get_state()
  it2 = d.iterator()
  it2.set_state(state)
  assert_same_batches(_all(it2), ref[6:])
  assert_same_batches(_all(d.iterator(start_step=5)), ref[5:])


def test_process_sharding_concatenates_to_the_global_batch(manifest):
  full = ip.pretrain_data(manifest, _cfg(epochs=1), seed=2)
  parts = [ip.pretrain_data(manifest, _cfg(epochs=1), seed=2, process_index=p, process_count=2) for p in (0, 1)]
  assert parts[0].pos_per_step == 6 and parts[0].num_steps == full.num_steps
  for step in (0, 3):
    want = full.batch(step)
    got = [p.batch(step) for p in parts]
    assert got[0]["pos"].shape[0] == 3 and got[0]["neg"].shape[0] == 5
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])


def test_configured_fraction_wraps_the_smaller_stream(manifest):
  d = ip.pretrain_data(manifest, _cfg(epochs=1, pos_fraction=0.5), seed=0)
  assert (d.pos_per_step, d.neg_per_step, d.steps_per_epoch) == (8, 8, 4)
  batches = _all(d.iterator())
  pos = np.concatenate([b["pos_ids"] for b in batches])
  assert len(pos) == 32 and sorted(pos[:N_POS]) == list(range(N_POS))  # a full pass, then wraps
  assert set(pos[N_POS:]) <= set(range(N_POS))
  neg = np.concatenate([b["neg_ids"] for b in batches])
  assert len(set(neg)) == 32  # N is not exhausted: no repeats


def test_bad_pretrain_settings(manifest):
  with pytest.raises(UserError, match="divisible"):
    ip.pretrain_data(manifest, _cfg(batch=15), seed=0, process_count=2)
  with pytest.raises(UserError, match="larger than the"):
    ip.pretrain_data(manifest, _cfg(batch=128), seed=0)


def test_embed_data_every_cell_once(manifest):
  cfg = _cfg()
  e = ip.embed_data(manifest, cfg, batch_size=16)
  used = sorted({c for b in manifest["bags"] for c in b["cells"]})
  assert len(e) == e.num_batches == 5 and e.num_cells == len(used) == 72
  batches = list(e)
  assert len(batches) == 5
  for b in batches:
    assert b["images"].shape == (16, 12, 12, 3) and b["images"].dtype == np.uint8
    assert b["cell_ids"].dtype == np.int32 and b["valid"].dtype == bool
  ids = np.concatenate([b["cell_ids"][b["valid"]] for b in batches])
  assert list(ids) == used
  last = batches[-1]
  assert last["valid"].sum() == 72 - 64 and (last["cell_ids"][~last["valid"]] == -1).all()
  np.testing.assert_array_equal(batches[1]["images"], ip.center_crops(manifest, cfg, batches[1]["cell_ids"]))
  full = ip.full_images(manifest, cfg, [0, 1])
  assert full.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(augment.center_crop(full[1], 12), ip.center_crops(manifest, cfg, [1])[0])
  # Two processes: same number of batches, half the rows each, together every cell.
  halves = [list(ip.embed_data(manifest, cfg, batch_size=16, process_index=p, process_count=2)) for p in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == 5 and halves[0][0]["images"].shape[0] == 8
  got = np.concatenate([h["cell_ids"][h["valid"]] for pair in zip(*halves) for h in pair])
  assert list(got) == used


def test_on_device_rows_carry_cells_and_their_step_and_row(manifest):
  cfg = _cfg(epochs=2)
  views = ip.pretrain_data(manifest, cfg, seed=4)
  cells = ip.pretrain_data(manifest, cfg, seed=4, on_device=True)
  assert cells.on_device and not views.on_device
  b, v = cells.batch(5), views.batch(5)
  np.testing.assert_array_equal(b["pos_ids"], v["pos_ids"])  # the same cells as the numpy path
  np.testing.assert_array_equal(b["neg_ids"], v["neg_ids"])
  assert b["pos"].shape == (6, 16, 16, 3) and b["neg"].shape == (10, 16, 16, 3) and b["pos"].dtype == np.uint8
  np.testing.assert_array_equal(b["pos"], ip.full_images(manifest, cfg, b["pos_ids"]))
  index = np.concatenate([b["pos_index"], b["neg_index"]])
  assert index.dtype == np.int32
  np.testing.assert_array_equal(index, np.stack([np.full(16, 5), np.arange(16)], axis=1))
  # Resume: an iterator started at step s (or restored there) gives the uninterrupted run's rows.
  ref = _all(cells.iterator())
  assert_same_batches(_all(cells.iterator(start_step=5)), ref[5:])
  it = cells.iterator()
  _all(it, 3)
  it2 = cells.iterator()
  it2.set_state(it.get_state())
  assert_same_batches(_all(it2), ref[3:])
