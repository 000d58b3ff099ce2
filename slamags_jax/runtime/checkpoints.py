"""Orbax checkpoints: the one way this package saves training state.

Three uses, all orbax: the pretraining run's checkpoints (``manager``, ``save``,
``restore_newest``), the final encoder (``save_encoder``), and the snapshot a preempted
MIL stage leaves (``save_snapshot``: host trees plus a JSON progress record, one folder
written through a temporary name and a rename).

``<workdir>/pretrain/checkpoints/<step>/`` holds two items: ``state`` (the whole
``TrainState``: parameters, BatchNorm statistics, optimizer state with the surgery's PRNG
key, step and skip counters) and ``data`` (the grain iterator position, one JSON file
per process). Orbax writes each checkpoint to a temporary folder
(``<step>.orbax-checkpoint-tmp-*``) and renames it when complete, so a run killed
mid-save leaves no checkpoint that ``latest_step()`` returns; the manager deletes such
leftovers when it opens (``cleanup_tmp_directories``). The newest complete checkpoint is
restored and the run continues exactly where it was.

A checkpoint that exists but fails to restore (a truncated or missing data file: disk
trouble, a copy cut short) is named in a warning and moved aside to
``<workdir>/pretrain/damaged_checkpoints/`` (kept for inspection; the run will save that
step again); the run resumes from the newest one that restores (``restore_newest``).
When none restores, that is one ``error:`` line, unless ``pretrain.start_over_if_damaged``
asks to start over. Damage that still restores (flipped bits in array data) is not
detected: OCDBT files carry no checksums of the arrays.

``<workdir>/pretrain/encoder/`` holds the final ``{"params", "batch_stats"}`` that the
embedding stage (or a user) loads, without the optimizer. It is written the same way
(temporary folder, then rename), and only before the stage's completion marker.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix of a folder being written


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
      item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, *, force: bool = False) -> None:
  """Starts an asynchronous save (arrays are copied to the host before it returns).

  The grain iterator state is taken synchronously, so ``data_iter`` may advance at once.
  """
  args = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**args), force=force)


def _abstract(x: Any) -> Any:
  return x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)


def restore(mngr: ocp.CheckpointManager, step: int, like_state: Any, data_iter: Any) -> Any:
  """Restores ``state`` shaped and sharded like ``like_state``; positions ``data_iter`` in place.

  ``like_state`` may hold arrays or ``jax.ShapeDtypeStruct``s with shardings (from
  ``jax.eval_shape``: a resume then needs no initialisation).
  """
  args = {"state": ocp.args.StandardRestore(jax.tree_util.tree_map(_abstract, like_state))}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**args))["state"]


def _short(e: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves the checkpoints of ``steps`` to ``damaged_checkpoints/`` beside the manager's folder."""
  from absl import logging

  from slamags_jax.runtime import parallel
  if not steps:
    return
  folder = os.path.abspath(os.fspath(mngr.directory))
  aside = os.path.join(os.path.dirname(folder), "damaged_checkpoints")
  if parallel.is_writer():
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      src = os.path.join(folder, str(step))
      dst = os.path.join(aside, str(step))
      n = 1
      while os.path.exists(dst):
        dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.replace(src, dst)
      logging.warning("moved the damaged checkpoint %s to %s", src, dst)
  parallel.sync("checkpoints: damaged ones set aside")
  mngr.reload()


def _closed_loop_error(exc_type, exc) -> bool:
  return exc_type is not None and issubclass(exc_type, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loop_callbacks() -> None:
  """Keeps tensorstore's late callbacks of a failed restore from printing tracebacks.

  When one read of an orbax restore fails, orbax closes its event loop while the other
  reads are still completing; each then fails to post its result (``RuntimeError: Event
  loop is closed``) and prints a traceback (through ``sys.excepthook`` or
  ``sys.unraisablehook``). They say nothing the warning does not, so these two hooks
  drop exactly that error (installed once, process-wide, before the first restore: the late
  callbacks can fire before the failed restore's exception reaches its handler).
  """
  if getattr(sys.excepthook, "_drops_closed_loop", False):
    return
  prev_except, prev_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _closed_loop_error(exc_type, exc):
      prev_except(exc_type, exc, tb)

  def unraisablehook(args):
    if not _closed_loop_error(args.exc_type, args.exc_value):
      prev_unraisable(args)

  excepthook._drops_closed_loop = True  # type: ignore[attr-defined]
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def restore_newest(mngr: ocp.CheckpointManager, like_state: Any, *, start_over: bool = False) -> tuple[int, Any]:
  """(step, state) of the newest checkpoint that restores; (0, None) when there is none.

  Checkpoints that fail to restore are named in a warning and set aside. When some
  exist and none restores, raises ``UserError`` unless ``start_over`` (then the run
  starts from step 0). Only complete checkpoints are candidates: orbax never lists a
  ``*.orbax-checkpoint-tmp*`` folder as a step.
  """
  from absl import logging

  from slamags_jax.runtime.errors import UserError
  damaged: list[int] = []
  reasons: list[str] = []
  _quiet_closed_loop_callbacks()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore(mngr, step, like_state, None)
    except Exception as e:  # tensorstore and orbax raise ValueError, OSError, ...
      path = os.path.join(os.fspath(mngr.directory), str(step))
      logging.warning("the checkpoint %s does not restore (%s); skipped", path, _short(e))
      damaged.append(step)
      reasons.append(f"step {step}: {_short(e, 120)}")
      continue
    _set_aside(mngr, damaged)
    return step, state
  if damaged and not start_over:
    raise UserError(f"no checkpoint in {mngr.directory} restores ({'; '.join(reasons)}): remove them, or rerun "
                    "with --config.pretrain.start_over_if_damaged=true to start pretraining afresh")
  if damaged:
    logging.warning("no checkpoint in %s restores; starting pretraining afresh (pretrain.start_over_if_damaged)",
                    mngr.directory)
    _set_aside(mngr, damaged)
  return 0, None


def restore_data_iterator(mngr: ocp.CheckpointManager, step: int, data_iter: Any) -> str | None:
  """Positions ``data_iter`` from the grain state saved at ``step``; None, or why it could not.

  The saved state fits only an iterator built the same way (e.g. with the same number
  of grain worker processes); the caller then starts a fresh iterator at ``step``.
  """
  try:
    mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
  except Exception as e:  # grain raises KeyError, ValueError, ...
    return f"{type(e).__name__}: {e}"
  return None


def remove_partial_saves(path: str) -> list[str]:
  """Deletes the temporary folders that killed saves of ``path`` left beside it."""
  path = os.path.abspath(path)
  folder, name = os.path.split(path)
  removed = []
  if os.path.isdir(folder):
    for entry in os.listdir(folder):
      if entry.startswith(name + _TMP):
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        removed.append(os.path.join(folder, entry))
  return removed


def save_encoder(path: str, variables: dict) -> None:
  """Writes ``variables`` to ``path`` (replacing it) through a temporary folder and a rename.

  Host (numpy) copies are saved, so the same call works with one or several processes;
  only process 0 clears leftovers of a killed save (another process must not delete
  the temporary folder process 0 has just created).
  """
  from slamags_jax.runtime import parallel
  if parallel.is_writer():
    remove_partial_saves(path)
  parallel.sync("encoder: leftovers removed")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), jax.device_get(variables), force=True)


def load_encoder(path: str, like: dict | None = None) -> dict:
  """The saved ``{"params", "batch_stats"}`` (as numpy-backed jax arrays on the default device)."""
  with ocp.StandardCheckpointer() as ckptr:
    if like is None:
      return ckptr.restore(os.path.abspath(path))
    abstract = jax.tree_util.tree_map(_abstract, like)
    return ckptr.restore(os.path.abspath(path), abstract)


def save_snapshot(path: str, trees: Any, progress: dict) -> None:
  """Writes ``trees`` (host copies) and ``progress`` (JSON) to the folder ``path``, replacing it atomically.

  Orbax writes to a temporary folder and renames it when complete, so a kill mid-save
  leaves the previous snapshot (or none), never half of one. Every process calls it;
  orbax lets process 0 write.
  """
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(path), args=ocp.args.Composite(
        trees=ocp.args.StandardSave(jax.device_get(trees)), progress=ocp.args.JsonSave(progress)), force=True)


def load_snapshot(path: str, like: Any) -> tuple[Any, dict]:
  """(trees shaped like ``like``, progress) from ``save_snapshot``; ValueError when they do not fit."""
  abstract = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), np.result_type(x)),
      like)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    try:
      got = ckptr.restore(os.path.abspath(path), args=ocp.args.Composite(
          trees=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path} holds arrays that do not match this model: {_short(e, 200)}") from e
  trees = got["trees"]
  for a, b in zip(jax.tree_util.tree_leaves(trees), jax.tree_util.tree_leaves(abstract)):
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
      raise ValueError(f"{path} holds arrays that do not match this model ({a.shape} {a.dtype} vs {b.shape} {b.dtype})")
  return trees, dict(got["progress"])
