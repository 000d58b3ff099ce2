"""Cell folder discovery, the broken-file check and image decoding."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from slamags_jax.data import cells as data
from slamags_jax.runtime.errors import UserError

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data", "pbc")


def _save(path, seed=0, size=(16, 16), fmt=None, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).convert(mode).save(path, format=fmt)
  return path


def _jpeg_bytes(seed=0, size=64):
  arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def test_discover_pbc_flat_layout(tmp_path):
  root = tmp_path / "pbc"
  _save(root / "lymphocyte" / "LY_2.jpg")
  _save(root / "lymphocyte" / "LY_1.JPG", fmt="JPEG")
  _save(root / "lymphocyte" / ".hidden.jpg")
  (root / "lymphocyte" / "notes.txt").write_text("not an image extension")
  _save(root / "lymphocyte" / ".cache" / "x.jpg")
  _save(root / "erythroblast" / "ERB_1.png")
  os.makedirs(root / ".git")
  got = data.discover(str(root), ["lymphocyte", "erythroblast"])
  assert got == {"lymphocyte": ["lymphocyte/LY_1.JPG", "lymphocyte/LY_2.jpg"],
                 "erythroblast": ["erythroblast/ERB_1.png"]}
  assert data.class_folders(str(root)) == ["erythroblast", "lymphocyte"]


def test_discover_matek_nested_layout(tmp_path):
  root = tmp_path / "bone_marrow_cell_dataset"
  for i in (1, 2, 1001):
    rng_dir = "0001-1000" if i <= 1000 else "1001-2000"
    _save(root / "LYT" / rng_dir / f"LYT_{i:05d}.jpg", seed=i)
  _save(root / "EBO" / "0001-1000" / "EBO_00001.jpg")
  got = data.discover(str(root), ["LYT", "EBO"])
  assert got["LYT"] == ["LYT/0001-1000/LYT_00001.jpg", "LYT/0001-1000/LYT_00002.jpg",
                        "LYT/1001-2000/LYT_01001.jpg"]
  assert got["EBO"] == ["EBO/0001-1000/EBO_00001.jpg"]


def test_discover_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data.discover(str(tmp_path / "nope"), ["a"])
  _save(tmp_path / "a" / "x.png")
  _save(tmp_path / "b" / "y.png")
  with pytest.raises(UserError, match=r"'c' has no folder.*class folders there: a, b"):
    data.discover(str(tmp_path), ["a", "c"])
  os.makedirs(tmp_path / "empty" / "sub")
  (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
  with pytest.raises(UserError, match="'empty' has no images"):
    data.discover(str(tmp_path), ["a", "empty"])


def test_find_unreadable_names_each_broken_file(tmp_path):
  root = tmp_path
  good = []
  for i in range(20):  # enough files for the thread pool path
    good.append(os.path.relpath(_save(root / "a" / f"ok{i}.png", seed=i), root))
  raw = _jpeg_bytes()
  (root / "a" / "ok.jpg").write_bytes(raw)
  (root / "a" / "empty.jpg").write_bytes(b"")
  (root / "a" / "text.jpg").write_text("this is not a JPEG\n")
  (root / "a" / "truncated.jpg").write_bytes(raw[: len(raw) * 2 // 3])
  (root / "a" / "no_eoi.jpg").write_bytes(raw[:-2])
  paths = good + ["a/ok.jpg", "a/empty.jpg", "a/text.jpg", "a/truncated.jpg", "a/no_eoi.jpg"]
  for workers in (1, 4):
    bad = dict(data.find_unreadable(str(root), paths, workers=workers))
    assert set(bad) == {"a/empty.jpg", "a/text.jpg", "a/truncated.jpg", "a/no_eoi.jpg"}
    assert bad["a/empty.jpg"] == "empty file"
    assert bad["a/text.jpg"] == "not an image"
    assert "truncated" in bad["a/truncated.jpg"]


def test_load_image_shape_dtype_and_modes(tmp_path):
  rgb = _save(tmp_path / "rgb.png", size=(20, 20))
  gray = _save(tmp_path / "gray.png", size=(20, 20), mode="L")
  rgba = _save(tmp_path / "rgba.png", size=(30, 20), mode="RGBA")
  for p in (rgb, gray, rgba):
    x = data.load_image(str(p), 12)
    assert x.shape == (12, 12, 3) and x.dtype == np.uint8
  # No resize when the size already matches: pixels unchanged.
  want = np.asarray(Image.open(rgb).convert("RGB"))
  np.testing.assert_array_equal(data.load_image(str(rgb), 20), want)
  # Bytes and file decode identically.
  raw = open(rgb, "rb").read()
  np.testing.assert_array_equal(data.decode_image(raw, 12), data.load_image(str(rgb), 12))
  # A wide image is centre-cropped to a square, not squashed.
  arr = np.zeros((10, 30, 3), np.uint8)
  arr[:, 10:20] = 200
  Image.fromarray(arr).save(tmp_path / "wide.png")
  np.testing.assert_array_equal(data.load_image(str(tmp_path / "wide.png"), 10), arr[:, 10:20])


def test_sample_data_is_intact_and_attributed():
  got = data.discover(SAMPLE, ["lymphocyte", "neutrophil", "erythroblast"])
  assert {c: len(p) for c, p in got.items()} == {"lymphocyte": 300, "neutrophil": 300, "erythroblast": 300}
  sums = {}
  with open(os.path.join(SAMPLE, "SHA256SUMS")) as f:
    for line in f:
      digest, name = line.split()
      sums[name] = digest
  assert sorted(sums) == sorted(p for ps in got.values() for p in ps)
  for name in sorted(sums)[::25]:  # spot-check bytes
    with open(os.path.join(SAMPLE, name), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == sums[name]
  readme = open(os.path.join(SAMPLE, "README.md"), encoding="utf-8").read()
  for must in ("Acevedo", "10.17632/snkd93bnjr.1", "CC BY 4.0", "128x128"):
    assert must in readme
