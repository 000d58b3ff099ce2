"""I/O failures as one `error:` line with the path and errno; a disk-full run and its rerun."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import subprocess
import sys

import pytest

from slamags_jax import main
from slamags_jax.runtime import fileio, ioerrors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The text of a real orbax save into a full 1 MB tmpfs (orbax 0.12.8, tensorstore).
ORBAX_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file '
    '"/mnt/ck/1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
    '"/mnt/ck/1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/5bd9acba": Failed to write '
    "2716264 bytes to file 11: No space left on device [os_error_code='28']")


def test_describe_oserrors_and_tensorstore_status_text():
  assert ioerrors.describe(OSError(errno.ENOSPC, "No space left on device", "/w/a.json")) == \
      "No space left on device (ENOSPC, errno 28): /w/a.json"
  assert ioerrors.describe(PermissionError(errno.EACCES, "Permission denied", "/w/x", None, "/w/y")) == \
      "Permission denied (EACCES, errno 13): /w/x -> /w/y"
  assert ioerrors.describe(ValueError(ORBAX_ENOSPC)) == (
      "No space left on device (ENOSPC, errno 28): "
      "/mnt/ck/1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/5bd9acba")
  # Wrapped in another exception; and a close() that fails again without the name.
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system", "/ro/summary.json")
    except OSError as e:
      raise OSError(errno.EROFS, "Read-only file system") from e
  except OSError as e:
    assert ioerrors.describe(RuntimeError("save failed")) is None
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = e
    assert ioerrors.describe(wrapped) == "Read-only file system (EROFS, errno 30): /ro/summary.json"
  assert ioerrors.describe(ValueError("shapes (3,) and (4,) differ")) is None
  assert ioerrors.describe(OSError("no errno")) is None


@contextlib.contextmanager
def _tmpfs(path, size: str):
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  if r.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root): " + r.stderr.decode(errors="replace").strip())
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_failed_write_names_its_file_and_keeps_the_old_one(tmp_path):
  with _tmpfs(tmp_path / "small", "64k") as folder:
    path = folder / "out.json"
    fileio.write_json(path, {"old": 1})
    with pytest.raises(OSError) as e:
      fileio.write_bytes(path, os.urandom(256 * 1024))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert fileio.read_json(path) == {"old": 1}
    assert [n for n in os.listdir(folder) if n != "out.json"] == []  # no temporary file left
    with pytest.raises(OSError) as e:
      for _ in range(200):
        fileio.append_jsonl(folder / "log.jsonl", {"pad": "x" * 1000})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(folder / "log.jsonl")


@pytest.mark.e2e
def test_disk_full_in_a_stage_is_one_error_line_and_the_rerun_continues(tmp_path):
  with _tmpfs(tmp_path / "disk", "40k") as disk:  # config.json fits, the manifest (~48 kB) does not
    workdir = disk / "work"
    cmd = [sys.executable, "-m", "slamags_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
           "--config.stages=bags"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    want = f"error: No space left on device (ENOSPC, errno 28): {workdir}/bags/manifest.json"
    assert errors == [want], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(workdir / "bags")) == []  # nothing half-written
    subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)  # space freed
    cfg = _demo_config()
    cfg.stages = "bags"
    main.run(cfg, str(workdir))  # the same run, in this process
    assert fileio.read_json(workdir / "bags" / "manifest.json")["bags"]


def test_a_read_only_workdir_is_refused_with_the_errno(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
  if r.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    cfg = _demo_config()
    with pytest.raises(main.UserError, match=rf"--workdir {ro} is not writable: Read-only file system \(EROFS\)"):
      main.run(cfg, str(ro))
  finally:
    subprocess.run(["umount", "-l", str(ro)], check=False)


def _demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  return demo.get_config()
