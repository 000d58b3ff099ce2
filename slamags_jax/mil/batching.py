"""MIL batches: bags padded to bucketed lengths (one compiled shape per tier)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

PAD_MULTIPLE = 32


_EVAL_ELEMENTS = 1 << 23  # cap on B * N * D floats per evaluation batch


Params = Any


Bag = dict[str, Any]


def bucket_length(n_max: int, multiple: int = PAD_MULTIPLE) -> int:
  """Padded bag length: ``n_max`` rounded up to a multiple of ``multiple`` (>= 1)."""
  return max(1, int(math.ceil(max(n_max, 1) / multiple)) * multiple)


def tier_length(n: int, cap: int, multiple: int = PAD_MULTIPLE) -> int:
  """Padded length of a batch whose largest bag has ``n`` cells: ``multiple`` x 2^j >= n, at most ``cap``.

  Why: slide bags vary from a hundred to 10,000+ cells; padding every bag to the largest
  would multiply the work of small ones. Power-of-two tiers bound the number of compiled
  shapes (log2(cap / 32) + 1); bags of one size get ``cap`` = ``bucket_length`` of it,
  as before.
  """
  length = multiple
  while length < n:
    length *= 2
  return min(length, cap)


def pad_batch(bags: Sequence[Bag], length: int, batch_size: int | None = None,
              dim: int | None = None) -> dict[str, np.ndarray]:
  """Stacks bags into x [B, length, D], mask, labels y and bag weights w.

  Slots beyond ``len(bags)`` (up to ``batch_size``) are empty bags of weight 0.
  """
  b = batch_size or len(bags)
  if len(bags) > b:
    raise ValueError(f"{len(bags)} bags do not fit a batch of {b}")
  d = dim if dim is not None else bags[0]["embeddings"].shape[1]
  x = np.zeros((b, length, d), np.float32)
  mask = np.zeros((b, length), bool)
  y = np.zeros((b,), np.int32)
  w = np.zeros((b,), np.float32)
  for i, bag in enumerate(bags):
    e = bag["embeddings"]
    n = e.shape[0]
    if n > length:
      raise ValueError(f"bag {bag.get('id')} has {n} cells, more than the padded length {length}")
    x[i, :n] = e
    mask[i, :n] = True
    y[i] = int(bag.get("label", 0))
    w[i] = 1.0
  return {"x": x, "mask": mask, "y": y, "w": w}


def eval_batch_size(length: int, dim: int, cap: int = 16) -> int:
  """Bags per evaluation batch, so that B * N * D stays under ~8M floats."""
  return max(1, min(cap, _EVAL_ELEMENTS // max(1, length * dim)))
