"""The strong views on the device: ``augment.strong_view`` as one jitted, batched JAX function.

``augment.on_device=true``: the host decodes and resizes the cells (uint8 [N, S, S, 3])
and sends them with each row's (step, row) index; the views are cut on the device,
inside the jitted training step, so the host never runs the per-view numpy work that
would starve an accelerator. The numpy views (``augment.py``) stay the reference and the
default.

Same transform as ``augment.strong_view``, in its order: random crop (uniform offset),
horizontal flip with ``flip_p``, colour jitter with ``jitter_p`` (torchvision
``ColorJitter``: brightness / contrast / saturation factors uniform in [1 - s, 1 + s]
(floored at 0), hue shift uniform in [-h, h], the four in a random order on [0, 1]
floats, clipped after each, rounded to uint8 at the end), rot90 with ``rot90_p`` and k
uniform in {1, 2, 3}.

Two halves, so each can be checked on its own (tests/test_device_augment.py):
``draw_params`` turns a key into a view's parameters (``ViewParams``), ``apply_view``
cuts the view from given parameters. Given the same parameters, crop, flip and rot90
are exactly numpy's; the jitter is within one uint8 level of ``augment.color_jitter``
(float32 reductions in another order). The draws come from JAX's PRNG, not numpy's, so
the views are the numpy path's in distribution, not pixel for pixel.

Keys: row ``row`` of the global batch of data step ``step`` gets
``fold_in(fold_in(fold_in(key(seed), 12), step), row)`` (12: the augmentation stream of
``input_pipeline``, whose numpy path seeds ``default_rng([seed, 12, step, row])``), and
view v the v-th row of ``uniform(row_key, (2, DRAWS))``. Nothing depends on the device
count or on how the batch is sharded, and a run resumed at step s draws what the
uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_AUG = 12  # as input_pipeline._AUG: the augmentation stream of a seed
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as augment._GRAY


class AugmentSpec(NamedTuple):
  """The ``augment`` section as static (hashable) floats: what the jitted function is built for."""
  flip_p: float
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  rot90_p: float


def spec_from_config(cfg_augment: Any) -> AugmentSpec:
  """``cfg.augment`` (or a dict with its keys) -> ``AugmentSpec``."""
  get = (lambda k: cfg_augment[k]) if isinstance(cfg_augment, dict) else (lambda k: getattr(cfg_augment, k))
  return AugmentSpec(*(float(get(k)) for k in AugmentSpec._fields))


class ViewParams(NamedTuple):
  """One view's random draws (leading axes: any batch shape)."""
  top: jax.Array  # int32, crop offset
  left: jax.Array  # int32
  flip: jax.Array  # bool
  jitter: jax.Array  # bool
  order: jax.Array  # int32 [4], a permutation of (brightness, contrast, saturation, hue)
  factors: jax.Array  # float32 [4]: brightness, contrast, saturation factors, hue shift
  k: jax.Array  # int32 quarter turns, 0 (no rotation) or 1..3


DRAWS = 14  # uniforms per view: 2 offsets, flip, jitter, 4 for the order, 4 factors, rot90, k


def params_from_uniforms(u: jax.Array, image_size: int, crop: int, spec: AugmentSpec) -> ViewParams:
  """One strong view's parameters from ``DRAWS`` uniforms on [0, 1) (the distributions of
  ``augment.strong_view``): offsets uniform on {0, ..., S - crop}, the order a uniform
  permutation (argsort of four uniforms), factors uniform on their ranges, k uniform on
  {1, 2, 3}.

  A jitter strength of 0 gives a neutral factor (1, or a hue shift of 0); ``apply_view``
  then skips that adjustment, as numpy does.
  """
  if crop > image_size:
    raise ValueError(f"crop {crop} larger than image {image_size}x{image_size}")
  span = image_size - crop + 1
  pick = lambda x, n: jnp.minimum(jnp.floor(x * n), n - 1).astype(jnp.int32)  # noqa: E731  (uniform on 0..n-1)

  def factor(x, s):
    lo, hi = max(0.0, 1.0 - s), 1.0 + s
    return lo + x * (hi - lo) if s > 0 else jnp.float32(1.0)

  return ViewParams(
      top=pick(u[0], span), left=pick(u[1], span),
      flip=u[2] < spec.flip_p, jitter=u[3] < spec.jitter_p,
      order=jnp.argsort(u[4:8]).astype(jnp.int32),
      factors=jnp.stack([factor(u[8], spec.brightness), factor(u[9], spec.contrast), factor(u[10], spec.saturation),
                         (2.0 * u[11] - 1.0) * spec.hue if spec.hue > 0 else jnp.float32(0.0)]).astype(jnp.float32),
      k=jnp.where(u[12] < spec.rot90_p, 1 + pick(u[13], 3), 0))


def draw_params(key: jax.Array, image_size: int, crop: int, spec: AugmentSpec) -> ViewParams:
  """One strong view's parameters from ``key`` (one PRNG call: XLA compiles each call site
  of the PRNG anew, and a dozen of them took seconds to compile)."""
  return params_from_uniforms(jax.random.uniform(key, (DRAWS,), jnp.float32), image_size, crop, spec)


def _gray(x: jax.Array) -> jax.Array:
  return x @ jnp.asarray(_GRAY, jnp.float32)


def _brightness(x, f):
  return jnp.clip(x * f, 0.0, 1.0)


def _contrast(x, f):
  return jnp.clip(f * x + (1.0 - f) * jnp.mean(_gray(x)), 0.0, 1.0)


def _saturation(x, f):
  return jnp.clip(f * x + (1.0 - f) * _gray(x)[..., None], 0.0, 1.0)


def _hue(x, shift):
  """``augment._adjust_hue`` in jnp (torchvision's RGB -> HSV -> RGB, closed form)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
  inv = 1.0 / jnp.where(delta > 0, delta, jnp.float32(1.0))
  rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = h * jnp.float32(1.0 / 6.0) + shift
  h = (h - jnp.floor(h)) * 6.0
  out = []
  for n in (5.0, 3.0, 1.0):
    k = h + n
    k = k - 6.0 * (k >= 6.0)
    out.append(maxc - delta * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(out, axis=-1)


def color_jitter(img: jax.Array, order: jax.Array, factors: jax.Array, spec: AugmentSpec) -> jax.Array:
  """uint8 [h, w, 3] -> uint8: the four adjustments in ``order`` with ``factors`` (see ``ViewParams``).

  An adjustment whose strength in ``spec`` is 0 is the identity, as in numpy.
  """
  ident = lambda x, f: x  # noqa: E731
  ops = [_brightness if spec.brightness > 0 else ident, _contrast if spec.contrast > 0 else ident,
         _saturation if spec.saturation > 0 else ident, _hue if spec.hue > 0 else ident]
  branches = [lambda x, op=op, j=j: op(x, factors[j]) for j, op in enumerate(ops)]
  x = img.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  # One loop body (not four unrolled switches): a quarter of the program to compile.
  x = jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], branches, x), x)
  return jnp.clip(jnp.rint(x * 255.0), 0, 255).astype(jnp.uint8)


def apply_view(img: jax.Array, p: ViewParams, crop: int, spec: AugmentSpec) -> jax.Array:
  """uint8 [S, S, 3] and one view's parameters -> the view, uint8 [crop, crop, 3]."""
  x = jax.lax.dynamic_slice(img, (p.top, p.left, 0), (crop, crop, img.shape[-1]))
  x = jnp.where(p.flip, x[:, ::-1], x)
  if spec.jitter_p > 0:
    x = jnp.where(p.jitter, color_jitter(x, p.order, p.factors, spec), x)
  if spec.rot90_p > 0:
    x = jax.lax.switch(p.k, [lambda y, k=k: jnp.rot90(y, k, axes=(0, 1)) for k in range(4)], x)
  return x


def row_keys(seed: int, index: jax.Array) -> jax.Array:
  """Per-row keys from int32 [N, 2] (data step, row in the global batch); see module docstring."""
  base = jax.random.fold_in(jax.random.key(seed), _AUG)
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i[0]), i[1]))(jnp.asarray(index))


def center_params(image_size: int, crop: int) -> ViewParams:
  """The centre crop (``augment.center_crop``) as view parameters: no flip, jitter or rotation."""
  off = jnp.int32((image_size - crop) // 2)
  return ViewParams(off, off, jnp.bool_(False), jnp.bool_(False), jnp.arange(4, dtype=jnp.int32),
                    jnp.asarray([1.0, 1.0, 1.0, 0.0], jnp.float32), jnp.int32(0))


def view_params(keys: jax.Array, image_size: int, crop: int, spec: AugmentSpec,
                center_first: bool = False) -> ViewParams:
  """Both views' parameters of each row: leaves [N, 2, ...]; view 0 the centre crop when ``center_first``."""
  def one(key):
    u = jax.random.uniform(key, (2, DRAWS), jnp.float32)  # row v: view v
    views = [params_from_uniforms(u[v], image_size, crop, spec) for v in range(2)]
    if center_first:
      views[0] = center_params(image_size, crop)
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *views)
  return jax.vmap(one)(keys)


def augment_rows(cells: jax.Array, index: jax.Array, *, seed: int, crop: int, spec: AugmentSpec,
                 center_first: bool = False) -> jax.Array:
  """uint8 [N, S, S, 3] cells and int32 [N, 2] (step, row) -> their two views, uint8 [N, 2, crop, crop, 3]."""
  params = view_params(row_keys(seed, index), cells.shape[1], crop, spec, center_first)
  per_view = jax.vmap(lambda img, p: apply_view(img, p, crop, spec), in_axes=(None, 0))
  return jax.vmap(per_view)(cells, params)


def augment_batch(batch: dict, *, seed: int, crop: int, spec: AugmentSpec, neg_center_view: bool) -> dict:
  """An on-device input batch (``pos`` / ``neg`` cells, ``pos_index`` / ``neg_index``) -> a view batch.

  The result has the keys and shapes of the numpy pipeline's batch (``pos`` / ``neg``
  uint8 [n, 2, crop, crop, 3], the ids passed through), so ``pretrain.train_step``
  takes it unchanged. Negative view 0 is the centre crop when ``neg_center_view``.
  """
  out = {k: v for k, v in batch.items() if k not in ("pos", "neg", "pos_index", "neg_index")}
  out["pos"] = augment_rows(batch["pos"], batch["pos_index"], seed=seed, crop=crop, spec=spec)
  out["neg"] = augment_rows(batch["neg"], batch["neg_index"], seed=seed, crop=crop, spec=spec,
                            center_first=neg_center_view)
  return out

