"""One run per workdir: the flock, its holder's description, no stale lock after kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from slamags_jax import config, main
from slamags_jax.runtime import workdir_lock
from slamags_jax.runtime.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(workdir) -> subprocess.Popen:
  """A process that takes the lock, says so on stdout, and sleeps."""
  code = ("import sys, time; from slamags_jax.runtime import workdir_lock; "
          f"l = workdir_lock.acquire({str(workdir)!r}); print('locked', flush=True); time.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def _tree(folder) -> dict:
  """Every path under ``folder`` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
  return out


def test_second_holder_is_refused_with_pid_and_host_until_the_first_dies(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(UserError) as e:
      workdir_lock.acquire(str(tmp_path))
    msg = str(e.value)
    assert f"workdir {tmp_path} is in use by pid {proc.pid} on host {socket.gethostname()} (started " in msg
  finally:
    os.kill(proc.pid, signal.SIGKILL)  # the OS releases the flock: no stale lock
    proc.wait()
  with workdir_lock.acquire(str(tmp_path)) as lock:
    assert lock.path == str(tmp_path / ".lock")
  with workdir_lock.acquire(str(tmp_path)):  # released: the same process may take it again
    pass


def test_main_refuses_a_workdir_in_use_and_writes_nothing(tmp_path):
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "pretrain").mkdir()
  (workdir / "pretrain" / ".metrics.jsonl.atomic-abc123.tmp").write_text("a write in flight")
  proc = _holder(workdir)
  try:
    before = _tree(workdir)
    time.sleep(0.01)
    cfg = config.get_base_config()
    cfg.data.root = os.path.join(REPO, "sample_data", "pbc")
    with pytest.raises(UserError, match=rf"workdir {workdir} is in use by pid {proc.pid} on host "):
      main.run(cfg, str(workdir))
    assert _tree(workdir) == before  # not even the other run's temporary files were swept
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
