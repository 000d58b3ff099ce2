"""TFDS builders: build on a tiny folder, read back through the data source, no TensorFlow."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from slamags_jax import bags
from slamags_jax import config as config_lib
from slamags_jax.data import input_pipeline as ip
from slamags_jax.data import tfds_cells
from slamags_jax.runtime.errors import UserError


def _write(path, seed, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("cells")
  for i in range(8):
    _write(root / "lym" / f"r{i % 2}" / f"lym_{i}.png", i, "PNG")
    _write(root / "neu" / f"neu_{i}.png", 100 + i, "PNG")
    _write(root / "ery" / "0001-1000" / f"ery_{i}.jpg", 200 + i, "JPEG")
  (root / "ery" / "0001-1000" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
  return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds_cells.prepare(str(folder), str(data_dir))
  return builder, str(data_dir)


def test_round_trip(folder, prepared):
  assert sys.modules.get("tensorflow") is None  # built and read without TensorFlow
  builder, data_dir = prepared
  assert builder.info.features["label"].names == ["ery", "lym", "neu"]
  assert [s[0] for s in builder.info.metadata["skipped"]] == ["ery/0001-1000/broken.jpg"]
  source = tfds_cells.data_source(data_dir)
  assert len(source) == 24
  seen = set()
  names = builder.info.features["label"].names
  for i in range(len(source)):
    rec = source[i]
    path = rec["path"].decode() if isinstance(rec["path"], bytes) else rec["path"]
    with open(folder / path, "rb") as f:
      assert rec["image"] == f.read()  # the original encoded bytes, unchanged
    assert names[int(rec["label"])] == path.split("/")[0]
    seen.add(path)
  assert len(seen) == 24 and "lym/r1/lym_1.png" in seen
  idx = tfds_cells.index(builder)
  assert sorted(idx.paths_of("ery")) == [f"ery/0001-1000/ery_{i}.jpg" for i in range(8)]
  assert [s[0] for s in idx.skipped] == ["ery/0001-1000/broken.jpg"]
  reader = pickle.loads(pickle.dumps(tfds_cells.RecordReader(data_dir)))
  r = idx.records_by_path()["neu/neu_3.png"]
  assert reader.read(r) == (folder / "neu" / "neu_3.png").read_bytes()


def test_prepare_refuses_another_folder(prepared, tmp_path):
  _, data_dir = prepared
  other = tmp_path / "other"
  _write(other / "a" / "x.png", 0, "PNG")
  with pytest.raises(UserError, match="prepared from"):
    tfds_cells.prepare(str(other), data_dir)
  with pytest.raises(UserError, match="does not exist"):
    tfds_cells.prepare(str(tmp_path / "missing"), str(tmp_path / "empty_tfds"))


def _cfg(folder, source, tfds_dir=""):
  cfg = config_lib.get_base_config()
  cfg.data.root = str(folder)
  cfg.data.normal_classes = "lym,neu"
  cfg.data.abnormal_classes = "ery"
  cfg.data.source = source
  cfg.data.tfds_data_dir = tfds_dir
  cfg.data.image_size = 16
  cfg.data.crop_size = 12
  cfg.bags.bag_size = 4
  cfg.bags.witness_rate = 0.25
  cfg.bags.n_train = 4
  cfg.bags.n_test = 2
  cfg.bags.val_fraction = 0.0
  cfg.pretrain.batch_size = 8
  cfg.pretrain.epochs = 1
  return cfg


def test_pipeline_reads_the_same_cells_from_tfds(folder, prepared, tmp_path):
  _, data_dir = prepared
  bags.run(_cfg(folder, "folder"), str(tmp_path / "f"))
  bags.run(_cfg(folder, "tfds", data_dir), str(tmp_path / "t"))
  mf = bags.load_manifest(str(tmp_path / "f"))
  mt = bags.load_manifest(str(tmp_path / "t"))
  assert [c["path"] for c in mf["cells"]] == [c["path"] for c in mt["cells"]]
  assert mf["bags"] == mt["bags"]  # same cells, same bags: the manifest does not depend on the source
  assert [e["path"] for e in mt["excluded"]] == ["ery/0001-1000/broken.jpg"]
  assert mt["excluded"] == mf["excluded"]  # the same check, at preparation time
  assert all("record" in c for c in mt["cells"])
  ids = bags.used_cell_ids(mf)
  want = ip.center_crops(mf, _cfg(folder, "folder"), ids)
  np.testing.assert_array_equal(ip.center_crops(mt, _cfg(folder, "tfds", data_dir), ids), want)
  # A folder-made manifest read through TFDS (records looked up by path).
  np.testing.assert_array_equal(ip.center_crops(mf, _cfg(folder, "tfds", data_dir), ids), want)
  a = ip.pretrain_data(mf, _cfg(folder, "folder"), seed=0).batch(0)
  b = ip.pretrain_data(mt, _cfg(folder, "tfds", data_dir), seed=0).batch(0)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_matek_builder_on_the_tcia_layout(tmp_path):
  root = tmp_path / "Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer" / "bone_marrow_cell_dataset"
  for i, c in enumerate(tfds_cells.MATEK_CLASSES):
    _write(root / c / "0001-1000" / f"{c}_{1:05d}.jpg", i, "JPEG")
  # manual_dir may be the parent of the class folders.
  builder = tfds_cells.prepare(str(root.parent), str(tmp_path / "tfds"), name="matek_bone_marrow")
  assert builder.name == "matek_bone_marrow"
  idx = tfds_cells.index(builder)
  assert len(idx.classes) == 21 and len(idx.paths) == 21
  assert idx.paths_of("LYT") == ["LYT/0001-1000/LYT_00001.jpg"]


@pytest.mark.e2e
def test_cli(folder, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "slamags_jax.data.tfds_cells", f"--manual_dir={folder}", f"--data_dir={tmp_path}"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "cell_folder: 24 records, 3 classes, 1 unreadable files skipped" in out.stdout
  out = subprocess.run(
      [sys.executable, "-m", "slamags_jax.data.tfds_cells", f"--manual_dir={tmp_path / 'nope'}",
       f"--data_dir={tmp_path / 'x'}"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ")
