"""The reference's views, in numpy: uint8 [H, W, 3] in, uint8 out.

Strong view (the authors' training transform, in their order):

1. random crop of ``crop`` px at a uniformly random position (a plain crop, not
   RandomResizedCrop: 224 from 250 in the paper, 48 from 54 on the CPU tier; the geometry
   is set by ``data.image_size`` / ``data.crop_size``, so any size works);
2. horizontal flip with probability ``augment.flip_p`` (0.5);
3. colour jitter with probability ``augment.jitter_p`` (0.8), as torchvision's
   ``ColorJitter(b, c, s, h)``: brightness, contrast and saturation factors uniform in
   [1 - s, 1 + s], a hue shift uniform in [-h, h], the four applied in a random order on
   [0, 1] floats (clipped after each, as torchvision), rounded back to uint8 at the end;
4. rotation by a multiple of 90 degrees with probability ``augment.rot90_p`` (0.8).
   Implementations of "rotate by 90" differ; here, when the rotation fires, k is uniform
   in {1, 2, 3} quarter turns, so it never degenerates to the identity.

The centre view is ``center_crop``. Normalisation is not part of the views: batches
stay uint8 (a quarter of the host-to-device traffic of float32) and the model
normalises on device; ``normalize`` is the numpy reference of that step.

All randomness comes from the ``np.random.Generator`` passed in; nothing global.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def center_crop(img: np.ndarray, crop: int) -> np.ndarray:
  """The centred ``crop`` x ``crop`` window (offset ``(size - crop) // 2``)."""
  h, w = img.shape[:2]
  if crop > h or crop > w:
    raise ValueError(f"crop {crop} larger than image {h}x{w}")
  top, left = (h - crop) // 2, (w - crop) // 2
  return img[top:top + crop, left:left + crop]


def random_crop(img: np.ndarray, rng: np.random.Generator, crop: int) -> np.ndarray:
  """A ``crop`` x ``crop`` window at a uniformly random position."""
  h, w = img.shape[:2]
  if crop > h or crop > w:
    raise ValueError(f"crop {crop} larger than image {h}x{w}")
  top = int(rng.integers(0, h - crop + 1))
  left = int(rng.integers(0, w - crop + 1))
  return img[top:top + crop, left:left + crop]


def _gray(x: np.ndarray) -> np.ndarray:
  return x @ _GRAY


def _adjust_brightness(x: np.ndarray, f: float) -> np.ndarray:
  return np.clip(x * f, 0.0, 1.0)


def _adjust_contrast(x: np.ndarray, f: float) -> np.ndarray:
  mean = _gray(x).mean()
  return np.clip(f * x + (1.0 - f) * mean, 0.0, 1.0)


def _adjust_saturation(x: np.ndarray, f: float) -> np.ndarray:
  g = _gray(x)[..., None]
  return np.clip(f * x + (1.0 - f) * g, 0.0, 1.0)


def _adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the hue by ``shift`` turns (torchvision's RGB -> HSV -> RGB on floats)."""
  xt = np.moveaxis(x, -1, 0)
  r, g, b = xt[0], xt[1], xt[2]
  maxc = np.maximum(np.maximum(r, g), b)  # = v
  delta = maxc - np.minimum(np.minimum(r, g), b)  # = v * s
  inv = 1.0 / np.where(delta > 0, delta, np.float32(1.0))
  rc = (maxc - r) * inv
  gc = (maxc - g) * inv
  bc = (maxc - b) * inv
  # Hue in sixths, in [-1, 5); 0 for grey pixels (delta = 0), where it does not matter.
  h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = h * np.float32(1.0 / 6.0) + np.float32(shift)
  h -= np.floor(h)  # the shifted hue, in turns, in [0, 1)
  h *= 6.0
  # HSV -> RGB in closed form: channel n in (5, 3, 1) for (R, G, B) is
  # v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6; equal to the piecewise
  # sector table that torchvision uses, without materialising all six candidates.
  out = np.empty_like(x)
  for c, n in enumerate((5.0, 3.0, 1.0)):
    k = h + n
    k -= 6.0 * (k >= 6.0)
    out[..., c] = maxc - delta * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return out


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> np.ndarray:
  """torchvision ``ColorJitter`` semantics on a uint8 image; returns uint8 (rounded).

  A strength of 0 disables that adjustment (no factor is drawn for it).
  """
  order = rng.permutation(4)
  b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None
  c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None
  s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None
  h = rng.uniform(-hue, hue) if hue > 0 else None
  x = img.astype(np.float32) * np.float32(1.0 / 255.0)
  for op in order:
    if op == 0 and b is not None:
      x = _adjust_brightness(x, np.float32(b))
    elif op == 1 and c is not None:
      x = _adjust_contrast(x, np.float32(c))
    elif op == 2 and s is not None:
      x = _adjust_saturation(x, np.float32(s))
    elif op == 3 and h is not None:
      x = _adjust_hue(x, np.float32(h))
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _get(cfg: Any, key: str) -> float:
  return float(cfg[key] if isinstance(cfg, dict) else getattr(cfg, key))


def strong_view(img: np.ndarray, rng: np.random.Generator, crop: int, cfg_augment: Any) -> np.ndarray:
  """The reference's strong augmentation (see the module docstring); uint8 [crop, crop, 3].

  ``cfg_augment`` is the ``augment`` config section (or a dict with the same keys).
  """
  x = random_crop(img, rng, crop)
  if rng.random() < _get(cfg_augment, "flip_p"):
    x = x[:, ::-1]
  if rng.random() < _get(cfg_augment, "jitter_p"):
    x = color_jitter(
        x, rng,
        _get(cfg_augment, "brightness"), _get(cfg_augment, "contrast"),
        _get(cfg_augment, "saturation"), _get(cfg_augment, "hue"),
    )
  if rng.random() < _get(cfg_augment, "rot90_p"):
    x = np.rot90(x, k=int(rng.integers(1, 4)), axes=(0, 1))
  return np.ascontiguousarray(x, dtype=np.uint8)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(x - mean) / std per channel, float32; uint8 input is first scaled to [0, 1].

  The numpy reference of the on-device normalisation (``data.mean`` / ``data.std``).
  """
  x = np.asarray(images)
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
