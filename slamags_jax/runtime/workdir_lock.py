"""One run per workdir: an advisory ``fcntl.flock`` on ``<workdir>/.lock``.

Two runs writing into the same workdir corrupt each other's checkpoints (each deletes
the other's temporary folders, both save the same steps). ``main`` takes the lock
before it writes anything and holds it until the process ends; the operating system
releases a flock when the process dies, so a ``kill -9`` leaves no stale lock (the
file itself stays: it is the lock, never removed, so that two runs cannot each lock a
different file of the same name). While held, the file says who holds it (pid, host,
start time), and a second run stops with one ``error:`` line naming them.

The lock is only as good as the file system's flock: local disks and NFSv4 honour it
across hosts; some FUSE mounts (e.g. Cloud Storage FUSE) do not. Multi-host runs: only
process 0 takes it (``main``), and the others learn the outcome from it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from slamags_jax.runtime.errors import UserError

NAME = ".lock"


class Lock:
  """An acquired workdir lock; ``release()`` (or process exit) frees it."""

  def __init__(self, path: str, fd: int):
    self.path = path
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(OSError):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holder(fd: int) -> str:
  """"pid N on host H (started T)" from the lock file, or what is known."""
  try:
    raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    info = json.loads(raw)
    return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another run (it has not written its pid yet)"


def acquire(workdir: str) -> Lock:
  """Locks ``workdir`` (which must exist) for this process, or raises ``UserError`` naming the holder."""
  path = os.path.join(workdir, NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      os.close(fd)
      raise
    holder = _holder(fd)
    os.close(fd)
    raise UserError(f"workdir {workdir} is in use by {holder}: wait for that run to end, or use another "
                    f"--workdir (the lock is {path})") from None
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode("utf-8"), 0)
    os.fsync(fd)
  except OSError:
    os.close(fd)
    raise
  return Lock(path, fd)


@contextlib.contextmanager
def hold(workdir: str):
  """Holds the lock of ``workdir`` for the block: process 0 takes it, every process learns the outcome.

  Raises ``UserError`` on every process when it is held by another run.
  """
  import jax

  from slamags_jax.runtime import parallel
  lock, error = None, None
  if parallel.is_writer():
    try:
      lock = acquire(workdir)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = UserError(f"workdir {workdir} is in use by another run (process 0 says by whom)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
