"""What the PyTorch parity scripts compare: the batch of real cells and the error measures.

Shared by ``check`` (JAX against PyTorch) and ``self_spread`` (PyTorch against itself), so
neither imports the other.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from tools import REPO


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max|a - b| / max|b| (0 when both are 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  diff = float(np.max(np.abs(a - b))) if b.size else 0.0
  return diff / scale if scale > 0 else diff


def global_rel_err(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys) -> float:
  """||a - b|| / ||b|| over the named tensors concatenated (one vector, as the surgery sees them)."""
  keys = list(keys)
  diff = math.sqrt(sum(float(np.sum(np.square(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
                       for k in keys))
  norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(b[k], np.float64)))) for k in keys))
  return diff / norm if norm > 0 else diff


SAMPLE = os.path.join(REPO, "sample_data", "pbc")


def make_batch(pos: int, neg: int, size: int, seed: int) -> dict[str, np.ndarray]:
  """uint8 patches [n, 2 views, size, size, 3]: real cells from sample_data/pbc, two views each.

  Positive patches are erythroblasts, negative ones lymphocytes and neutrophils; each
  view is the cell resized to size + size // 8 px, cropped at a random offset, maybe
  flipped. (With synthetic blobs at 32 px and 6 + 6 patches, the float32 runs of both
  sides and the float64 run drifted apart within 3 steps: that batch amplified rounding.)
  """
  from PIL import Image
  rng = np.random.default_rng(seed)
  big = size + size // 8

  def cells(classes, n):
    paths = sorted(p for c in classes for p in glob.glob(os.path.join(SAMPLE, c, "*.jpg")))
    if len(paths) < n:
      raise SystemExit(f"error: {SAMPLE} has {len(paths)} images of {classes}, need {n}")
    return [np.asarray(Image.open(p).convert("RGB").resize((big, big), Image.BILINEAR))
            for p in rng.choice(paths, n, replace=False)]

  def view(img):
    y, x = rng.integers(0, big - size + 1, 2)
    v = img[y:y + size, x:x + size]
    return v[:, ::-1] if rng.random() < 0.5 else v

  return {"pos": np.stack([[view(c), view(c)] for c in cells(["erythroblast"], pos)]).astype(np.uint8),
          "neg": np.stack([[view(c), view(c)] for c in cells(["lymphocyte", "neutrophil"], neg)]).astype(np.uint8)}


def step_errors(loss_a: dict, state_a: dict, start_a: dict, loss_b: dict, state_b: dict, start_b: dict) -> dict:
  """Errors of run a against run b after one step (b is the reference, torch keys).

  loss: max over tasks of |a - b| / max(1, |b|); param, stat: ||a - b|| / ||b|| over all
  parameters / all BatchNorm running statistics as one vector; update: the same for the
  parameters' change since each run's own start. Plus the worst single tensor of each
  (max|a - b| / max|b|).
  """
  def is_stat(k):
    return k.endswith(("running_mean", "running_var"))
  if set(state_a) != set(state_b):
    raise AssertionError(f"key sets differ: {sorted(set(state_a) ^ set(state_b))[:4]}")
  p_keys = [k for k in state_b if not is_stat(k)]
  s_keys = [k for k in state_b if is_stat(k)]
  d_a = {k: np.asarray(state_a[k], np.float64) - np.asarray(start_a[k], np.float64) for k in p_keys}
  d_b = {k: np.asarray(state_b[k], np.float64) - np.asarray(start_b[k], np.float64) for k in p_keys}
  def worst(errs):
    return list(max(errs.items(), key=lambda kv: kv[1]))
  return {"loss": max(abs(loss_a[t] - loss_b[t]) / max(1.0, abs(loss_b[t])) for t in loss_b),
          "param": global_rel_err(state_a, state_b, p_keys), "stat": global_rel_err(state_a, state_b, s_keys),
          "update": global_rel_err(d_a, d_b, p_keys),
          "param_worst_tensor": worst({k: rel_err(state_a[k], state_b[k]) for k in p_keys}),
          "stat_worst_tensor": worst({k: rel_err(state_a[k], state_b[k]) for k in s_keys}),
          "update_worst_tensor": worst({k: rel_err(d_a[k], d_b[k]) for k in p_keys})}
