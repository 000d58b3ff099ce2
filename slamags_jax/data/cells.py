"""Cell folder datasets: discovery, the broken-file check and image decoding.

A cell folder is a root with one sub-folder per cell class; images are found
recursively below each class folder, which covers both layouts in use:

- PBC (Acevedo et al. 2020): ``<class>/<name>.jpg``;
- Matek / TCIA bone marrow: ``<CLASS>/<range>/<CLASS>_NNNNN.jpg``.

Paths are kept relative to the root (posix separators) everywhere, so a bag manifest
names cells the same way whether they are read from the folder or from a TFDS dataset
prepared from it (``slamags_jax.data.tfds_cells``).

Real folders contain broken files (empty, truncated, not an image at all).
``find_unreadable`` decodes every file fully once, in a thread pool, so the bags stage can
exclude them before any bag is drawn instead of crashing mid-training.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile

from slamags_jax.runtime.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Resampling used to bring every cell to ``data.image_size``. Pillow's bilinear filter
# widens its support when it shrinks an image (it is antialiased, like torchvision's
# ``Resize(antialias=True)``), so it is a good, cheap choice for both the 128 -> 54 px
# CPU tier and the 250 px paper tier (where no resize happens at all).
RESAMPLE = Image.Resampling.BILINEAR


def is_image_file(name: str) -> bool:
  """True for a non-hidden file name with an image extension (case-insensitive)."""
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(root: str) -> list[str]:
  """Sorted names of the (non-hidden) class folders directly under ``root``."""
  if not os.path.isdir(root):
    raise UserError(f"data root {root!r} does not exist or is not a folder")
  return sorted(
      e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir()
  )


def _walk_images(folder: str, root: str) -> list[str]:
  """Relative posix paths of the image files below ``folder`` (symlinked folders followed once)."""
  out = []
  seen = set()
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symlink loop: do not descend again
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if is_image_file(name):
        out.append(os.path.join(rel_dir, name).replace(os.sep, "/"))
  return sorted(out)


def images_below(folder: str, root: str) -> list[str]:
  """Sorted relative (to ``root``) posix paths of the image files found recursively below ``folder``."""
  return _walk_images(folder, root)


def discover(root: str, classes: Sequence[str]) -> dict[str, list[str]]:
  """Class -> sorted relative paths of its image files, found recursively.

  Raises ``UserError`` for a missing root, a class with no folder (naming the folders
  that exist) or a class folder without images.
  """
  available = class_folders(root)
  out = {}
  for c in classes:
    if c not in available:
      shown = ", ".join(available) if available else "none"
      raise UserError(f"class {c!r} has no folder in data root {root!r}; class folders there: {shown}")
    paths = _walk_images(os.path.join(root, c), root)
    if not paths:
      raise UserError(
          f"class {c!r} has no images in {os.path.join(root, c)!r} "
          f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
      )
    out[c] = paths
  return out


def check_image_bytes(data: bytes) -> str | None:
  """Why these encoded bytes are not a fully decodable image, or None when they are."""
  if not data:
    return "empty file"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # a full decode: verify() alone accepts truncated JPEGs
      if im.width < 1 or im.height < 1:
        return "image has no pixels"
  except Image.UnidentifiedImageError:
    return "not an image"
  except Image.DecompressionBombError as e:
    return f"decompression bomb: {e}"
  except Exception as e:  # plugins raise all sorts on bad input
    msg = str(e).strip() or type(e).__name__
    return f"cannot decode: {msg}"
  return None


def check_image_file(path: str) -> str | None:
  """Why the file at ``path`` is not a fully decodable image, or None when it is."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"cannot read: {e.strerror or e}"
  return check_image_bytes(data)


def find_unreadable(
    root: str, paths: Iterable[str], workers: int | None = None
) -> list[tuple[str, str]]:
  """(relative path, reason) of every file under ``root`` that does not decode fully.

  Each image is decoded completely (Pillow ``load()``), which catches empty files,
  non-images and truncated JPEGs. Decoding releases the GIL, so a thread pool
  (``workers`` threads, default: the CPU count) parallelises the check. The result is in
  the order of ``paths``.

  Relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; if some other
  code switched it on, truncated files would pass, so this refuses to run then.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images "
        "cannot be detected. Leave it at its default (False)."
    )
  paths = list(paths)
  workers = workers or min(32, os.cpu_count() or 1)
  full = [os.path.join(root, p) for p in paths]
  if workers <= 1 or len(paths) < 16:
    reasons = list(map(check_image_file, full))
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      reasons = list(pool.map(check_image_file, full))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _to_square_rgb(im: Image.Image, size: int) -> np.ndarray:
  """RGB, centre-cropped to a square when not square, resized to ``size`` x ``size``."""
  if im.mode != "RGB":
    im = im.convert("RGB")
  w, h = im.size
  if w != h:  # keep the cell's shape: crop the largest centred square first
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
  if im.size != (size, size):
    im = im.resize((size, size), RESAMPLE)
  return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3] (RGB; see ``load_image``)."""
  with Image.open(io.BytesIO(data)) as im:
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
      # Let libjpeg decode at a reduced scale when the target is much smaller (cheap
      # and exact to the factor); the bilinear resize then finishes the job.
      im.draft(im.mode, (size, size))
    return _to_square_rgb(im, size)


def load_image(path: str, size: int) -> np.ndarray:
  """Decodes the image file at ``path`` -> uint8 [size, size, 3], RGB.

  Non-RGB images are converted; a non-square image is centre-cropped to its largest
  square (cells are centred in both datasets); then it is resized with Pillow's
  antialiased bilinear filter (``RESAMPLE``). JPEGs are decoded with libjpeg's DCT
  scaling when the target is at most half the stored size.
  """
  with open(path, "rb") as f:
    return decode_image(f.read(), size)
