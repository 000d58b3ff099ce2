"""Checkpoint resume with damage: a checkpoint that fails to restore is skipped and set aside."""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax.runtime import checkpoints
from slamags_jax.runtime.errors import UserError


def _state(v: float) -> dict:
  return {"w": jnp.full((64, 32), v, jnp.float32), "count": jnp.asarray(int(v), jnp.int32)}


def _saved(folder, steps) -> None:
  mngr = checkpoints.manager(str(folder), keep=10)
  for s in steps:
    checkpoints.save(mngr, s, _state(float(s)), None, force=True)
  mngr.close()


def _truncate_data_files(step_dir) -> int:
  """Cuts every OCDBT data file of the ``state`` item to half its size (a copy cut short)."""
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)
        n += 1
  return n


# A failed restore leaves tensorstore callbacks that would print "Event loop is closed"
# tracebacks; checkpoints keeps them quiet, and these tests fail if one gets through.
QUIET = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@QUIET
def test_damaged_newest_is_skipped_and_set_aside(tmp_path, caplog):
  ckpts = tmp_path / "pretrain" / "checkpoints"
  _saved(ckpts, [4, 5])
  assert _truncate_data_files(ckpts / "5") >= 1
  # A partial save of a later step (a kill mid-save) must never be a candidate.
  partial = ckpts / "6.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  mngr = checkpoints.manager(str(ckpts), keep=10)
  assert 6 not in mngr.all_steps()
  with caplog.at_level(logging.WARNING):
    step, state = checkpoints.restore_newest(mngr, _state(0.0))
  assert step == 4 and int(state["count"]) == 4
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((64, 32), 4.0, np.float32))
  text = caplog.text
  assert f"{ckpts / '5'} does not restore" in text and "skipped" in text
  # Step 5 was moved aside (kept for inspection), so the run can save step 5 again.
  assert (tmp_path / "pretrain" / "damaged_checkpoints" / "5").is_dir()
  assert list(mngr.all_steps()) == [4]
  checkpoints.save(mngr, 5, _state(5.0), None, force=True)
  mngr.close()


@QUIET
def test_none_restores_is_one_error_unless_starting_over(tmp_path):
  ckpts = tmp_path / "pretrain" / "checkpoints"
  _saved(ckpts, [2])
  _truncate_data_files(ckpts / "2")
  mngr = checkpoints.manager(str(ckpts), keep=10)
  with pytest.raises(UserError, match=r"no checkpoint in .* restores \(step 2: .*start_over_if_damaged=true"):
    checkpoints.restore_newest(mngr, _state(0.0))
  assert (ckpts / "2").is_dir()  # nothing moved without the user's word
  assert checkpoints.restore_newest(mngr, _state(0.0), start_over=True) == (0, None)
  assert not (ckpts / "2").exists() and (tmp_path / "pretrain" / "damaged_checkpoints" / "2").is_dir()
  mngr.close()


def test_no_checkpoints_is_a_fresh_start(tmp_path):
  mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
  assert checkpoints.restore_newest(mngr, _state(0.0)) == (0, None)
  mngr.close()
