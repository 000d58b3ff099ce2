"""On-device views: the numpy reference's ops given the same draws, the draws' distributions, keys."""

import itertools

import jax
import numpy as np
import pytest

from slamags_jax import config as config_lib
from slamags_jax.data import augment
from slamags_jax.data import device_augment as da

SIZE, CROP = 12, 8
SPEC = da.spec_from_config(config_lib.get_base_config().augment)  # the defaults: every op on
NO_JITTER = SPEC._replace(jitter_p=0.0)


def _cells(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _index(n, step=0):
  return np.stack([np.full(n, step, np.int32), np.arange(n, dtype=np.int32)], axis=1)


def _numpy_jitter(x, order, factors):
  """augment.color_jitter with given order and factors (its draws replaced)."""
  ops = (augment._adjust_brightness, augment._adjust_contrast, augment._adjust_saturation, augment._adjust_hue)
  y = x.astype(np.float32) * np.float32(1.0 / 255.0)
  for op in order:
    y = ops[op](y, np.float32(factors[op]))
  return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def _numpy_view(img, p, crop, jitter=True):
  """augment.strong_view's ops in its order, with the device's draws."""
  x = img[p["top"]:p["top"] + crop, p["left"]:p["left"] + crop]
  if p["flip"]:
    x = x[:, ::-1]
  if jitter and p["jitter"]:
    x = _numpy_jitter(x, p["order"], p["factors"])
  if p["k"]:
    x = np.rot90(x, k=int(p["k"]), axes=(0, 1))
  return np.ascontiguousarray(x)


def _params_and_views(spec, n=48, seed=3):
  cells, index = _cells(n), _index(n)
  fn = jax.jit(lambda c, i: (da.view_params(da.row_keys(seed, i), SIZE, CROP, spec),
                             da.augment_rows(c, i, seed=seed, crop=CROP, spec=spec)))
  params, views = jax.device_get(fn(cells, index))
  return cells, {k: np.asarray(v) for k, v in params._asdict().items()}, np.asarray(views)


def test_crop_flip_rot90_equal_numpy_given_the_draws():
  cells, params, views = _params_and_views(NO_JITTER)
  assert views.shape == (48, 2, CROP, CROP, 3) and views.dtype == np.uint8
  seen = set()
  for i, v in itertools.product(range(48), range(2)):
    p = {k: a[i, v] for k, a in params.items()}
    np.testing.assert_array_equal(views[i, v], _numpy_view(cells[i], p, CROP, jitter=False))
    seen.add((bool(p["flip"]), int(p["k"])))
  assert len(seen) == 8  # every flip x rotation case was exercised


def test_jitter_within_one_level_of_numpy_given_the_draws():
  spec = SPEC._replace(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.3)
  cells, params, views = _params_and_views(spec)
  worst = 0
  for i, v in itertools.product(range(48), range(2)):
    p = {k: a[i, v] for k, a in params.items()}
    ref = _numpy_view(cells[i], p, CROP).astype(int)
    worst = max(worst, int(np.abs(views[i, v].astype(int) - ref).max()))
  assert worst <= 1
  assert len({tuple(params["order"][i, v]) for i, v in itertools.product(range(48), range(2))}) > 12


def test_a_zero_strength_skips_its_adjustment():
  spec = SPEC._replace(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, flip_p=0.0, rot90_p=0.0)
  cells, params, views = _params_and_views(spec, n=4)
  assert np.all(params["factors"] == np.asarray([1.0, 1.0, 1.0, 0.0], np.float32))
  for i in range(4):  # the jitter is then the identity (as numpy's with all strengths 0)
    p = {k: a[i, 0] for k, a in params.items()}
    np.testing.assert_array_equal(views[i, 0], cells[i][p["top"]:p["top"] + CROP, p["left"]:p["left"] + CROP])


def test_center_first_is_the_center_crop():
  cells, index = _cells(4), _index(4)
  views = np.asarray(jax.jit(lambda c, i: da.augment_rows(c, i, seed=0, crop=CROP, spec=SPEC, center_first=True))(
      cells, index))
  for i in range(4):
    np.testing.assert_array_equal(views[i, 0], augment.center_crop(cells[i], CROP))
  assert not all(np.array_equal(views[i, 1], views[i, 0]) for i in range(4))


def test_drawn_parameters_have_the_numpy_distributions():
  n = 20000
  keys = jax.random.split(jax.random.key(7), n)
  p = jax.device_get(jax.jit(jax.vmap(lambda k: da.draw_params(k, SIZE, CROP, SPEC)))(keys))
  span = SIZE - CROP + 1
  for offsets in (p.top, p.left):  # uniform on {0, ..., S - crop}
    counts = np.bincount(offsets, minlength=span)
    assert len(counts) == span and np.all(np.abs(counts / n - 1 / span) < 0.015)
  for rate, prob in ((p.flip.mean(), SPEC.flip_p), (p.jitter.mean(), SPEC.jitter_p), ((p.k > 0).mean(), SPEC.rot90_p)):
    assert abs(rate - prob) < 0.015
  ks = np.bincount(p.k[p.k > 0], minlength=4)[1:]
  assert np.all(np.abs(ks / ks.sum() - 1 / 3) < 0.02)
  for j, s in enumerate((SPEC.brightness, SPEC.contrast, SPEC.saturation)):
    f = p.factors[:, j]
    assert f.min() >= 1 - s and f.max() <= 1 + s and abs(f.mean() - 1) < 0.005
    assert f.min() < 1 - 0.95 * s and f.max() > 1 + 0.95 * s
  h = p.factors[:, 3]
  assert h.min() >= -SPEC.hue and h.max() <= SPEC.hue and abs(h.mean()) < 0.005
  perms = np.unique(p.order, axis=0, return_counts=True)[1]
  assert len(perms) == 24 and np.all(np.abs(perms / n - 1 / 24) < 0.01)
  # numpy's draws, as augment.strong_view makes them, for the same rates and ranges
  rng = np.random.default_rng(0)
  tops = rng.integers(0, span, n)
  assert np.all(np.abs(np.bincount(tops, minlength=span) / n - 1 / span) < 0.015)


def test_views_are_a_function_of_seed_step_and_row_only():
  cells = _cells(6)
  fn = jax.jit(lambda c, i, s: da.augment_rows(c, i, seed=s, crop=CROP, spec=SPEC), static_argnums=2)
  a, b = np.asarray(fn(cells, _index(6, 5), 1)), np.asarray(fn(cells, _index(6, 5), 1))
  np.testing.assert_array_equal(a, b)
  # A row's views do not depend on the other rows of the batch (or on where it is sharded).
  part = np.asarray(fn(cells[2:4], _index(6, 5)[2:4], 1))
  np.testing.assert_array_equal(part, a[2:4])
  assert not np.array_equal(np.asarray(fn(cells, _index(6, 6), 1)), a)  # another step
  assert not np.array_equal(np.asarray(fn(cells, _index(6, 5), 2)), a)  # another seed


def test_augment_batch_has_the_numpy_batch_layout():
  batch = {"pos": _cells(2), "neg": _cells(3, 1), "pos_ids": np.arange(2, dtype=np.int32),
           "neg_ids": np.arange(3, dtype=np.int32), "pos_index": _index(2), "neg_index": _index(3) + [0, 2]}
  out = jax.device_get(da.augment_batch(batch, seed=0, crop=CROP, spec=SPEC, neg_center_view=True))
  assert set(out) == {"pos", "neg", "pos_ids", "neg_ids"}
  assert out["pos"].shape == (2, 2, CROP, CROP, 3) and out["neg"].shape == (3, 2, CROP, CROP, 3)
  np.testing.assert_array_equal(out["neg"][:, 0], np.stack([augment.center_crop(x, CROP) for x in batch["neg"]]))


def test_crop_larger_than_the_image_is_refused():
  with pytest.raises(ValueError, match="crop"):
    da.draw_params(jax.random.key(0), 8, 9, SPEC)
