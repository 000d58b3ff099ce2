"""Atomic output files: write to a temporary file in the same folder, fsync, rename.

A run killed at any moment leaves either the old file or the complete new one, never a
truncated file that a re-run would trust. Every output of the pipeline that a later
stage or a re-run reads (manifest, summaries, CSVs, embeddings, reports) goes through
these helpers. A SIGKILL can leave the hidden temporary file behind (nothing can remove
it then); it is never read, and ``remove_stale_temps`` (run by ``main`` at start) sweeps
it away. ``metrics.jsonl`` is the one append-only log; its reader skips a torn line, and
an append after a torn last line starts on a fresh line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any, Iterator

import numpy as np


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _current_umask()
_TMP_TAG = ".atomic-"  # temporary files are ".<name>.atomic-<random>.tmp"
_TMP_RE = re.compile(r"^\..+\.atomic-[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
  """Opens a temporary sibling of ``path``; renames it onto ``path`` on success.

  On an exception the temporary file is removed and ``path`` is left untouched.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open supports 'w' and 'wb', not {mode!r}")
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + _TMP_TAG, suffix=".tmp", dir=folder)
  os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; outputs follow the umask
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno and e.filename is None:
      raise OSError(e.errno, e.strerror, path) from e  # a failed write() names no file: name it
    raise
  _fsync_dir(folder)


def is_temp_name(name: str, target: str | None = None) -> bool:
  """True for the name of an ``atomic_open`` temporary file (of ``target``, when given)."""
  return bool(_TMP_RE.match(name)) and (target is None or name.startswith("." + target + _TMP_TAG))


def remove_stale_temps(folder: str | os.PathLike, target: str | None = None) -> list[str]:
  """Deletes temporary files that killed atomic writes left in ``folder``; returns their paths.

  Only those of ``target`` (a file name) when given. Call it only when no other process
  writes to ``folder`` (``main`` does, at start).
  """
  folder = os.fspath(folder)
  removed = []
  with contextlib.suppress(FileNotFoundError, NotADirectoryError):
    for entry in os.scandir(folder):
      if entry.is_file(follow_symlinks=False) and is_temp_name(entry.name, target):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(entry.path)
          removed.append(entry.path)
  return removed


def _fsync_dir(folder: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def to_json(obj: Any, compact: bool = False) -> str:
  """Deterministic JSON (sorted keys, 1-space indent or ``compact``: none, trailing newline)."""
  if compact:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_json_default) + "\n"
  return json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n"


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> None:
  write_text(path, to_json(obj, compact))


def read_json(path: str | os.PathLike) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """``np.savez`` through a temporary file (np.savez itself writes in place)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def to_json_line(record: dict[str, Any]) -> str:
  return json.dumps(record, sort_keys=True, default=_json_default) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
  """Appends one JSON line and flushes it to disk.

  A last line torn by a kill (no trailing newline) is closed first, so that the new
  record is not glued onto it and lost with it.
  """
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  line = to_json_line(record)
  try:
    with open(path, "ab+") as f:
      if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          line = "\n" + line
      f.write(line.encode("utf-8"))
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    if e.filename is None and e.errno:  # a failed write() names no file: name it
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a JSON-lines log, skipping a last line torn by a kill."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (provenance in manifests and model cards)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
