"""The reference's views: shape, dtype, range, determinism, and each op's semantics."""

from __future__ import annotations

import colorsys
import time

import numpy as np
import pytest

from slamags_jax import config as config_lib
from slamags_jax.data import augment


def _img(size=54, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _aug(**kw):
  a = dict(config_lib.get_base_config().augment)
  a.update(kw)
  return a


@pytest.mark.parametrize("size,crop", [(54, 48), (250, 224), (16, 16)])
def test_strong_view_keeps_dtype_and_range(size, crop):
  img = _img(size)
  for seed in range(5):
    v = augment.strong_view(img, np.random.default_rng(seed), crop, config_lib.get_base_config().augment)
    assert v.shape == (crop, crop, 3) and v.dtype == np.uint8 and v.flags.c_contiguous
  # Extreme pixel values stay in range (uint8 cannot overflow silently).
  sat = np.zeros((size, size, 3), np.uint8)
  sat[::2] = 255
  v = augment.strong_view(sat, np.random.default_rng(0), crop, _aug(jitter_p=1.0, brightness=0.9, contrast=0.9))
  assert v.dtype == np.uint8


def test_strong_view_is_deterministic_for_a_seed():
  img = _img()
  cfg = _aug()
  a = augment.strong_view(img, np.random.default_rng(3), 48, cfg)
  b = augment.strong_view(img, np.random.default_rng(3), 48, cfg)
  np.testing.assert_array_equal(a, b)
  others = [augment.strong_view(img, np.random.default_rng(s), 48, cfg) for s in range(4, 8)]
  assert any(not np.array_equal(a, o) for o in others)


def test_center_crop():
  img = _img(54)
  np.testing.assert_array_equal(augment.center_crop(img, 48), img[3:51, 3:51])
  np.testing.assert_array_equal(augment.center_crop(_img(250), 224), _img(250)[13:237, 13:237])
  with pytest.raises(ValueError):
    augment.center_crop(img, 60)


def test_random_crop_positions_cover_the_range():
  img = np.arange(10 * 10 * 3, dtype=np.int64).reshape(10, 10, 3)
  rng = np.random.default_rng(0)
  corners = {tuple(augment.random_crop(img, rng, 8)[0, 0, :1]) for _ in range(200)}
  assert len(corners) == 9  # 3 x 3 positions


def test_flip_and_rotation_probabilities_and_semantics():
  img = _img(16)
  only_flip = _aug(flip_p=1.0, jitter_p=0.0, rot90_p=0.0)
  np.testing.assert_array_equal(augment.strong_view(img, np.random.default_rng(0), 16, only_flip), img[:, ::-1])
  nothing = _aug(flip_p=0.0, jitter_p=0.0, rot90_p=0.0)
  np.testing.assert_array_equal(augment.strong_view(img, np.random.default_rng(0), 16, nothing), img)
  only_rot = _aug(flip_p=0.0, jitter_p=0.0, rot90_p=1.0)
  seen = set()
  for s in range(30):
    v = augment.strong_view(img, np.random.default_rng(s), 16, only_rot)
    ks = [k for k in (1, 2, 3) if np.array_equal(v, np.rot90(img, k))]
    assert len(ks) == 1  # always a real quarter-turn rotation, never the identity
    seen.add(ks[0])
  assert seen == {1, 2, 3}
  # p = 0.8: roughly 80 % of the views are rotated.
  no_flip_or_jitter = _aug(flip_p=0.0, jitter_p=0.0)
  rotated = sum(not np.array_equal(augment.strong_view(img, np.random.default_rng(s), 16, no_flip_or_jitter), img)
                for s in range(400))
  assert 290 < rotated < 350


def test_hue_matches_colorsys():
  x = _img(12).astype(np.float32) / 255.0
  for shift in (0.1, -0.07, 0.5):
    got = augment._adjust_hue(x, shift)
    want = np.empty_like(x)
    for i in range(12):
      for j in range(12):
        h, s, v = colorsys.rgb_to_hsv(*x[i, j].astype(np.float64))
        want[i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_color_jitter_matches_torchvision_formulas():
  img = _img(8)
  x = img.astype(np.float64) / 255.0
  gray = x @ np.array([0.299, 0.587, 0.114])
  # Brightness alone: x * f, clipped, rounded.
  rng = np.random.default_rng(5)
  out = augment.color_jitter(img, rng, 0.5, 0.0, 0.0, 0.0)
  rng = np.random.default_rng(5)
  rng.permutation(4)
  f = rng.uniform(0.5, 1.5)
  np.testing.assert_array_equal(out, np.clip(np.rint(np.clip(x * f, 0, 1) * 255), 0, 255).astype(np.uint8))
  # Contrast alone: blend with the mean grey level.
  rng = np.random.default_rng(6)
  out = augment.color_jitter(img, rng, 0.0, 0.5, 0.0, 0.0)
  rng = np.random.default_rng(6)
  rng.permutation(4)
  f = rng.uniform(0.5, 1.5)
  want = np.clip(f * x + (1 - f) * gray.mean(), 0, 1)
  assert np.abs(out.astype(int) - np.rint(want * 255)).max() <= 1
  # Saturation 0 -> grey: a factor of exactly 0 is reachable with strength 1.
  y = augment._adjust_saturation(x.astype(np.float32), np.float32(0.0))
  np.testing.assert_allclose(y, np.repeat(gray[..., None], 3, -1), atol=1e-6)
  # All strengths zero: unchanged.
  np.testing.assert_array_equal(augment.color_jitter(img, np.random.default_rng(0), 0, 0, 0, 0), img)


def test_normalize():
  img = np.full((2, 4, 4, 3), 255, np.uint8)
  out = augment.normalize(img, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [2.0, 1.0, 0.5])
  np.testing.assert_allclose(augment.normalize(np.ones((1, 3), np.float32), (0, 0, 0), (1, 1, 1)), 1.0)


def test_strong_view_is_cheap():
  img = _img(54)
  cfg = _aug()
  rng = np.random.default_rng(0)
  for _ in range(20):
    augment.strong_view(img, rng, 48, cfg)
  t = time.perf_counter()
  for _ in range(200):
    augment.strong_view(img, rng, 48, cfg)
  per_image = (time.perf_counter() - t) / 200
  assert per_image < 3e-3, f"{per_image * 1e3:.2f} ms per 48 px view"
