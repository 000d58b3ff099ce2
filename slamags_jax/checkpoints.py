"""Orbax checkpoints of the pretraining run and of the final encoder.

``<workdir>/pretrain/checkpoints/<step>/`` holds two items: ``state`` (the whole
``TrainState``: parameters, BatchNorm statistics, optimizer state with the surgery's PRNG
key, step and skip counters) and ``data`` (the grain iterator position, one JSON file
per process). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed mid-save leaves no checkpoint that a re-run would trust; the
newest complete one is restored and the run continues exactly where it was.

``<workdir>/pretrain/encoder/`` holds the final ``{"params", "batch_stats"}`` that the
embedding stage (or a user) loads, without the optimizer.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
      item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, *, force: bool = False) -> None:
  args = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, like_state: Any, data_iter: Any) -> Any:
  """Restores ``state`` shaped and sharded like ``like_state``; positions ``data_iter`` in place."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  args = {"state": ocp.args.StandardRestore(abstract)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**args))["state"]


def save_encoder(path: str, variables: dict) -> None:
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), variables, force=True)


def load_encoder(path: str, like: dict | None = None) -> dict:
  """The saved ``{"params", "batch_stats"}`` (as numpy-backed jax arrays on the default device)."""
  with ocp.StandardCheckpointer() as ckptr:
    if like is None:
      return ckptr.restore(os.path.abspath(path))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return ckptr.restore(os.path.abspath(path), abstract)
