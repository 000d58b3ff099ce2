"""The one CLI layer (slamags_jax.app): what each failure means at the top of a command."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from slamags_jax import app, export
from slamags_jax.runtime import preemption
from slamags_jax.runtime.errors import UserError


def test_exit_status_maps_user_errors_io_failures_and_signals(capsys):
  assert app.exit_status(UserError("bad\n  value")) == 2
  assert capsys.readouterr().err == "error: bad value\n"
  assert app.exit_status(OSError(errno.ENOSPC, "No space left on device", "/w/out.json")) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "ENOSPC" in err and "/w/out.json" in err and len(err.splitlines()) == 1
  assert app.exit_status(preemption.Preempted(signal.SIGTERM, "stopped")) == 143
  assert app.exit_status(KeyboardInterrupt()) == 130
  assert app.exit_status(RuntimeError("a bug")) is None  # re-raised: a traceback


def test_guarded_exits_with_the_status():
  def disk_full():
    raise OSError(errno.ENOSPC, "No space left on device", "/w/x")

  with pytest.raises(SystemExit) as e:
    app.guarded(disk_full)()
  assert e.value.code == 2
  with pytest.raises(RuntimeError):
    app.guarded(lambda: (_ for _ in ()).throw(RuntimeError("bug")))()


def test_export_reports_a_full_disk_as_one_error_line(tmp_path, monkeypatch, capsys):
  def full(*args):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "enc.safetensors"))

  monkeypatch.setattr(export, "export", full)
  assert export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'enc.safetensors'}"]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "ENOSPC" in err and "Traceback" not in err


@pytest.mark.e2e
@pytest.mark.parametrize("cli", ["main", "predict", "export", "bench"])
def test_every_command_answers_help_with_status_0(cli):
  r = subprocess.run([sys.executable, "-m", f"slamags_jax.{cli}", "--help"], capture_output=True, text=True,
                     timeout=300, env={**os.environ, "SLAMAGS_JAX_HUGEPAGES": "0"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--workdir" in r.stdout + r.stderr or cli == "bench"
  assert "Traceback" not in r.stderr
