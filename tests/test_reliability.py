"""Reliability (issue #7): kill-and-resume, atomic outputs, non-finite steps, collapse monitor.

The end-to-end tests run the real CLI in subprocesses on the demo config and share
compiled programs through the session's persistent XLA cache (tests/conftest.py):

- kill and resume: an uninterrupted run, a run SIGKILLed after its first checkpoint
  (mid-save when the timing allows), the re-run of the same command, SIGTERMed after a
  step (issue #18: it saves that step and exits 143; a second run started meanwhile on
  the same workdir is refused), and a last re-run, which must end with the
  uninterrupted run's parameters;
- non-finite steps: `nan_injected_cli` runs the CLI with `pretrain.train_step` wrapped
  (see there): at step 3 the NT-Xent loss is NaN (its gradients stay finite), at steps 7
  and 8 the positive views are NaN (the network's ReLUs turn the loss finite again, the
  gradients are NaN); whether a step is poisoned is decided inside jit from `state.step`,
  and the real step's guard must catch both kinds. One run stops on the consecutive
  bad steps; the same command with a higher `pretrain.max_bad_steps` resumes from the
  last good checkpoint and finishes.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from slamags_jax import pretrain
from slamags_jax.runtime import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 420  # seconds for one subprocess run (a cold compile on two busy cores)

# The acceptance command (issue #7) on a small share of the demo: 16 training bags (12 after
# validation) give 288 pretraining patches, 6 steps of 48 per epoch; two epochs. The XLA
# convolution lowering compiles faster (the lowerings are checked equal in test_conv).
DEMO = ["--config=configs/demo.py", "--config.stages=bags,pretrain", "--config.pretrain.checkpoint_every_steps=2",
        "--config.pretrain.epochs=2", "--config.bags.n_train=16", "--config.bags.n_test=16",
        "--config.pretrain.batch_size=48", "--config.model.conv_impl=xla"]
# NaN runs: no probe (nothing to compile).
NAN_ARGS = DEMO + ["--config.pretrain.probe_cells=0", "--config.pretrain.keep_checkpoints=10"]
NAN_LOSS_STEPS = (3,)  # 1-based steps whose NT-Xent loss is NaN (finite gradients)
NAN_INPUT_STEPS = (7, 8)  # 1-based steps whose positive views are NaN (non-finite gradients)


def _cli(args: list[str], workdir, log_name: str, *, prefix: list[str] | None = None) -> tuple[int, str]:
  """Runs the CLI to completion; (exit status, stderr). Output goes to files, not pipes."""
  proc = _start(args, workdir, log_name, prefix=prefix)
  rc = proc.wait(timeout=TIMEOUT)
  return rc, _read(workdir, log_name)


def _start(args, workdir, log_name, *, prefix=None) -> subprocess.Popen:
  os.makedirs(os.path.dirname(os.fspath(workdir)), exist_ok=True)
  cmd = [sys.executable] + (prefix or ["-m", "slamags_jax.main"]) + [f"--workdir={workdir}"] + args
  with open(f"{workdir}.{log_name}.log", "w") as log:  # the child keeps its own handle
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)


def _read(workdir, log_name) -> str:
  with open(f"{workdir}.{log_name}.log", encoding="utf-8", errors="replace") as f:
    return f.read()


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def _summary(workdir) -> dict:
  return fileio.read_json(os.path.join(workdir, "pretrain", "summary.json"))


def _steps(path: str) -> list[int]:
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(n) for n in names if n.isdigit())


def _comparable(records: list[dict]) -> list[dict]:
  """Metric lines without the timing fields (which differ from run to run)."""
  return [{k: v for k, v in r.items() if k not in ("wall_s", "images_per_s")} for r in records]


# ----------------------------------------------------------------------------- kill and resume

@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
  """Uninterrupted run; run killed after its first checkpoint; the same command again."""
  root = tmp_path_factory.mktemp("resume")
  full, killed = root / "full", root / "killed"
  rc, err = _cli(DEMO, full, "run")
  assert rc == 0, err[-3000:]

  proc = _start(DEMO, killed, "run")
  ckpts = killed / "pretrain" / "checkpoints"
  first, mid_save, t0 = None, False, time.monotonic()
  try:
    while proc.poll() is None and time.monotonic() - t0 < TIMEOUT:
      names = os.listdir(ckpts) if ckpts.is_dir() else []
      done = sorted(int(n) for n in names if n.isdigit())
      saving = [n for n in names if ".orbax-checkpoint-tmp" in n]
      if first is None and done:
        first = done[0]
      if first is not None and (saving or len(done) > 1):  # mid-save of a later step, or just after it
        mid_save = bool(saving)
        break
      time.sleep(0.005)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{_read(killed, 'run')[-3000:]}"
  after_kill = {"names": sorted(os.listdir(ckpts)), "mid_save": mid_save,
                "summary": (killed / "pretrain" / "summary.json").exists()}
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(str(ckpts), options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    after_kill["latest"] = mngr.latest_step()
    after_kill["all"] = list(mngr.all_steps())
  # The rerun is preempted (SIGTERM) once it has taken a step; meanwhile a second run on
  # the same workdir is refused. The third run completes.
  # The killed run logged steps past its checkpoint: a step counts once the resumed run has
  # cut metrics.jsonl back (an atomic rewrite: a new inode) and then logged past it.
  metrics_path = killed / "pretrain" / "metrics.jsonl"
  stale = os.stat(metrics_path).st_ino if metrics_path.exists() else None
  proc = _start(DEMO, killed, "resume")
  intruder = None
  t0 = time.monotonic()
  try:
    while proc.poll() is None and time.monotonic() - t0 < TIMEOUT:
      if intruder is None and os.path.exists(killed / ".lock") and str(proc.pid) in (killed / ".lock").read_text():
        intruder = _cli(DEMO, killed, "intruder") + (proc.poll() is None,)
      fresh = metrics_path.exists() and os.stat(metrics_path).st_ino != stale
      steps = [r["step"] for r in fileio.read_jsonl(metrics_path) if r.get("kind") == "step"] if fresh else []
      if intruder is not None and steps and steps[-1] > after_kill["latest"]:
        os.kill(proc.pid, signal.SIGTERM)
        break
      time.sleep(0.005)
    preempted_rc = proc.wait(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
  resumed_err = _read(killed, "resume")
  after_term = {"rc": preempted_rc, "steps": _steps(killed / "pretrain" / "checkpoints"), "log": resumed_err}
  rc, final_err = _cli(DEMO, killed, "final")
  assert rc == 0, final_err[-3000:]
  return {"full": full, "killed": killed, "after_kill": after_kill, "resume_log": resumed_err,
          "after_term": after_term, "final_log": final_err, "intruder": intruder}


@pytest.mark.e2e
def test_killed_run_resumes_to_the_uninterrupted_parameters(demo_runs):
  full, killed, k = demo_runs["full"], demo_runs["killed"], demo_runs["after_kill"]
  # The kill left no completion marker and only complete checkpoints that orbax reports.
  assert not k["summary"]
  assert k["latest"] == max(int(n) for n in k["names"] if n.isdigit())
  assert k["all"] == sorted(int(n) for n in k["names"] if n.isdigit())
  assert f"resumed pretraining from the checkpoint of step {k['latest']} of 12" in demo_runs["resume_log"]
  a, b = _summary(full), _summary(killed)
  assert a["steps"] == b["steps"] == 12 and b["skipped_steps"] == 0
  np.testing.assert_allclose(b["param_l2"], a["param_l2"], rtol=1e-6)
  assert b["param_l2"] == a["param_l2"], "the resumed run should be bit-identical"
  assert b["final_loss"] == a["final_loss"] and b["final_effective_rank"] == a["final_effective_rank"]
  # metrics.jsonl: the lines logged after the checkpoint were dropped and logged again, once.
  ma = fileio.read_jsonl(full / "pretrain" / "metrics.jsonl")
  mb = fileio.read_jsonl(killed / "pretrain" / "metrics.jsonl")
  assert _comparable(mb) == _comparable(ma)
  assert [r["step"] for r in mb if r["kind"] == "step"] == list(range(1, 13))
  # Orbax's temporary folders of the killed save were cleaned up; the encoder is complete.
  assert not [n for n in os.listdir(killed / "pretrain" / "checkpoints") if not n.isdigit()]
  assert os.path.isdir(killed / "pretrain" / "encoder")


@pytest.mark.e2e
def test_sigterm_saves_the_step_and_the_rerun_continues_from_it(demo_runs):
  """SIGTERM during training: the step is finished and saved, one log line, exit 143."""
  t = demo_runs["after_term"]
  assert t["rc"] == 143, t["log"][-3000:]
  lines = [line for line in t["log"].splitlines() if "SIGTERM received" in line]
  assert len(lines) == 1, t["log"][-3000:]
  saved = int(lines[0].split("finished step ")[1].split()[0])
  assert f"finished step {saved} of 12 and saved its checkpoint in " in lines[0]
  assert lines[0].endswith("; rerun the same command to continue")
  assert saved == max(t["steps"]) and "Traceback" not in t["log"] and not _error_lines(t["log"])
  assert f"resumed pretraining from the checkpoint of step {saved} of 12" in demo_runs["final_log"]
  # The final parameters equal the uninterrupted run's: test_killed_run_resumes_... checks them.


@pytest.mark.e2e
def test_a_second_run_on_a_workdir_in_use_is_refused(demo_runs):
  rc, err, first_still_running = demo_runs["intruder"]
  assert first_still_running, "the first run ended before the second was refused: the test did not race"
  assert rc == 2 and "Traceback" not in err
  assert len(_error_lines(err)) == 1
  assert _error_lines(err)[0].startswith(f"error: workdir {demo_runs['killed']} is in use by pid ")


@pytest.mark.e2e
def test_collapse_monitor_is_logged_per_epoch_and_summarised(demo_runs):
  summary = _summary(demo_runs["full"])
  epochs = [r for r in fileio.read_jsonl(demo_runs["full"] / "pretrain" / "metrics.jsonl") if r["kind"] == "epoch"]
  assert [r["epoch"] for r in epochs] == [0, 1]
  for r in epochs:
    assert 1.0 <= r["effective_rank"] <= 64 and 0.0 < r["spread"] <= 1.5
  assert isinstance(summary["final_effective_rank"], float)
  assert summary["final_effective_rank"] == epochs[-1]["effective_rank"]


@pytest.mark.e2e
def test_kill_after_the_final_checkpoint_and_during_the_encoder_save(demo_runs, tmp_path):
  """Killed after the last checkpoint, mid-way through the encoder, before summary.json."""
  work = tmp_path / "w"
  shutil.copytree(demo_runs["full"], work)
  shutil.rmtree(work / "pretrain" / "encoder")
  os.unlink(work / "pretrain" / "summary.json")
  partial = work / "pretrain" / "encoder.orbax-checkpoint-tmp-1234567890"  # what a kill mid-save leaves
  os.makedirs(partial / "d")
  (partial / "d" / "half").write_bytes(b"\0" * 100)
  partial_step = work / "pretrain" / "checkpoints" / "14.orbax-checkpoint-tmp-1234567890"  # never a checkpoint
  shutil.copytree(work / "pretrain" / "checkpoints" / "12" / "data", partial_step / "data")
  rc, err = _cli(DEMO, work, "run")
  assert rc == 0, err[-3000:]
  assert "resumed pretraining from the checkpoint of step 12 of 12" in err
  full = _summary(demo_runs["full"])
  again = _summary(work)
  assert again["param_l2"] == full["param_l2"] and again["final_effective_rank"] == full["final_effective_rank"]
  assert not partial.exists() and not partial_step.exists()
  from slamags_jax.runtime import checkpoints
  encoder = checkpoints.load_encoder(str(work / "pretrain" / "encoder"))
  assert pretrain.param_l2(encoder["params"]) == full["param_l2"]


# ----------------------------------------------------------------------------- non-finite steps

def nan_injected_cli() -> None:
  """The CLI with non-finite steps injected (entry point of the subprocess runs).

  `pretrain.train_step` is wrapped (where `pretrain.stage` calls it): from `state.step` (inside jit) it decides whether
  this step gets NaN positive views (`NAN_INPUT_STEPS`) or a NaN added to the NT-Xent
  loss (`NAN_LOSS_STEPS`, through `losses.nt_xent` while the step is traced; a constant
  added to a loss leaves its gradient finite), then runs the real `train_step`, whose
  guard must skip the update and count it. Nothing in the package changes.
  """
  import jax.numpy as jnp
  from absl import app

  from slamags_jax import losses, main
  from slamags_jax.pretrain import stage as pretrain_stage

  real_step, real_nt_xent = pretrain.train_step, losses.nt_xent
  loss_flag = []  # the traced "NaN loss" flag of the step being traced

  def nt_xent_with_nans(*args, **kwargs):
    return real_nt_xent(*args, **kwargs) + jnp.where(loss_flag[-1], jnp.nan, 0.0)

  def train_step_with_nans(state, batch, **kw):
    step = state.step + 1
    bad_input = jnp.isin(step, jnp.asarray(NAN_INPUT_STEPS, step.dtype))
    pos = batch["pos"].astype(jnp.float32) + jnp.where(bad_input, jnp.nan, 0.0).astype(jnp.float32)
    loss_flag.append(jnp.isin(step, jnp.asarray(NAN_LOSS_STEPS, step.dtype)))
    try:
      return real_step(state, {**batch, "pos": pos}, **kw)
    finally:
      loss_flag.pop()

  pretrain_stage.train_step = train_step_with_nans  # the name the stage's loop calls
  losses.nt_xent = nt_xent_with_nans
  app.run(main.main, flags_parser=main._parse_flags)


_NAN_PREFIX = ["-c", f"import sys; sys.path.insert(0, {TESTS!r}); import test_reliability as t; t.nan_injected_cli()"]


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
  """max_bad_steps=2: steps 7 and 8 stop the run; then 3 lets the same command finish."""
  work = tmp_path_factory.mktemp("nan") / "w"
  stop_rc, stop_err = _cli(NAN_ARGS + ["--config.pretrain.max_bad_steps=2"], work, "stop", prefix=_NAN_PREFIX)
  ckpts = work / "pretrain" / "checkpoints"
  after_stop = {"steps": _steps(ckpts), "summary": (work / "pretrain" / "summary.json").exists(),
                "encoder": (work / "pretrain" / "encoder").exists(),
                "metrics": fileio.read_jsonl(work / "pretrain" / "metrics.jsonl")}
  import orbax.checkpoint as ocp

  from slamags_jax.runtime import checkpoints
  mngr = checkpoints.manager(str(ckpts), keep=10)
  after_stop["latest"] = mngr.latest_step()
  after_stop["restored"] = mngr.restore(after_stop["latest"], args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"] if after_stop["latest"] else None
  mngr.close()
  rc, err = _cli(NAN_ARGS + ["--config.pretrain.max_bad_steps=3"], work, "finish", prefix=_NAN_PREFIX)
  return {"work": work, "stop_rc": stop_rc, "stop_err": stop_err, "after_stop": after_stop,
          "rc": rc, "err": err}


@pytest.mark.e2e
def test_consecutive_non_finite_steps_stop_the_run(nan_runs):
  r, after = nan_runs, nan_runs["after_stop"]
  assert r["stop_rc"] == 2, r["stop_err"][-3000:]
  errors = _error_lines(r["stop_err"])
  assert len(errors) == 1 and r["stop_err"].rstrip().splitlines()[-1] == errors[0]
  assert "Traceback" not in r["stop_err"]
  assert "2 consecutive pretraining steps had non-finite loss or gradients (the last at step 8" in errors[0]
  assert "the last good checkpoint is step 6" in errors[0]
  # Nothing was saved after the first bad step of the streak; no completion marker, no encoder.
  assert after["steps"] == [2, 4, 6] and after["latest"] == 6
  assert not after["summary"] and not after["encoder"]
  state = after["restored"]
  assert int(state["step"]) == 6 and int(state["bad_total"]) == 1 and int(state["bad_streak"]) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(state["params"]))
  skipped = [r for r in after["metrics"] if r.get("skipped")]
  assert [r["step"] for r in skipped] == [3, 7, 8]
  assert not np.isfinite(skipped[0]["loss"])  # step 3: NaN loss; steps 7, 8: NaN gradients


@pytest.mark.e2e
def test_non_finite_steps_are_skipped_and_counted(nan_runs):
  r = nan_runs
  assert r["rc"] == 0, r["err"][-3000:]
  assert "resumed pretraining from the checkpoint of step 6 of 12" in r["err"]
  assert "step 7: non-finite loss or gradients; update skipped (1 in a row)" in r["err"]
  summary = _summary(r["work"])
  assert summary["steps"] == 12 and summary["skipped_steps"] == 3  # step 3 (restored count), 7 and 8
  assert np.isfinite(summary["param_l2"]) and np.isfinite(summary["final_loss"])
  records = [x for x in fileio.read_jsonl(r["work"] / "pretrain" / "metrics.jsonl") if x["kind"] == "step"]
  assert [x["step"] for x in records] == list(range(1, 13))
  assert [x["step"] for x in records if x["skipped"]] == [3, 7, 8]
  assert all(np.isfinite(x["loss"]) for x in records if not x["skipped"])
  assert not np.isfinite(records[2]["loss"])
  assert _steps(r["work"] / "pretrain" / "checkpoints") == [2, 4, 6, 10, 12]  # none after a bad step


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_data_iterator_position_is_checkpointed(tmp_path):
  """The grain state restores the position; a state that does not fit is reported, not raised."""
  import grain
  import jax.numpy as jnp

  from slamags_jax.runtime import checkpoints
  ds = grain.MapDataset.range(10)
  it = iter(ds.to_iter_dataset())
  for _ in range(3):
    next(it)
  mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
  checkpoints.save(mngr, 3, {"x": jnp.zeros(2)}, it, force=True)
  next(it)  # the saved position is the one at save time
  mngr.wait_until_finished()
  fresh = iter(ds.to_iter_dataset())
  assert checkpoints.restore_data_iterator(mngr, 3, fresh) is None and next(fresh) == 3
  # A state of another pipeline shape (grain worker processes, as saved with data.workers > 0).
  data_dir = tmp_path / "ckpt" / "3" / "data"
  for name in os.listdir(data_dir):
    if name.endswith(".json"):
      (data_dir / name).write_text(json.dumps({"next_index_in_cycle": 0, "exhausted": []}))
  assert checkpoints.restore_data_iterator(mngr, 3, iter(ds.to_iter_dataset())) is not None
  mngr.close()


# ----------------------------------------------------------------------------- collapse monitor

def test_collapse_warning_fires_for_collapsed_embeddings():
  rng = np.random.default_rng(0)
  healthy = pretrain.probe_stats(rng.standard_normal((64, 16)))
  assert pretrain.collapse_message(3, healthy) is None
  one_point = np.outer(np.ones(64), rng.standard_normal(16)) + 1e-6 * rng.standard_normal((64, 16))
  message = pretrain.collapse_message(3, pretrain.probe_stats(one_point))
  assert message is not None and message.startswith("epoch 3: embeddings of the probe cells look collapsed")
  # Spread over a line through the origin: a spread near 1 but rank 1 is collapse too.
  line = np.outer(rng.standard_normal(64), rng.standard_normal(16))
  assert pretrain.collapse_message(1, pretrain.probe_stats(line)) is not None
  assert pretrain.collapse_message(1, {}) is None  # probe disabled


# ----------------------------------------------------------------------------- atomic writes

def _no_temps(folder) -> bool:
  return not [n for n in os.listdir(folder) if fileio.is_temp_name(n) or n.endswith(".tmp")]


def test_atomic_write_that_raises_midway_leaves_the_old_file(tmp_path):
  path = tmp_path / "summary.json"
  fileio.write_json(path, {"old": 1})
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(path, "w") as f:
      f.write('{"new": ')
      f.flush()
      raise RuntimeError("crash mid-write")
  assert fileio.read_json(path) == {"old": 1} and _no_temps(tmp_path)
  # A generator that fails while a CSV is streamed out (report.write_cells_csv's pattern).
  import csv

  def rows():
    yield ["a", "b"]
    raise KeyError("missing column")

  with pytest.raises(KeyError):
    with fileio.atomic_open(tmp_path / "cells.csv", "w") as f:
      w = csv.writer(f)
      for row in rows():
        w.writerow(row)
  assert not (tmp_path / "cells.csv").exists() and _no_temps(tmp_path)


@pytest.mark.parametrize("fail_at", ["fsync", "rename"])
def test_atomic_write_crash_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch, fail_at):
  """A failure after the data is written but before it replaces the file (disk full, crash)."""
  old = tmp_path / "emb.npz"
  fileio.save_npz(old, embeddings=np.ones((2, 3), np.float32))
  target = "fsync" if fail_at == "fsync" else "replace"
  real = getattr(os, target)

  def boom(*args, **kwargs):
    if fail_at == "fsync" or str(args[1]).endswith(".npz") or str(args[1]).endswith(".json"):
      raise OSError(28, "simulated crash")
    return real(*args, **kwargs)

  monkeypatch.setattr(os, target, boom)
  with pytest.raises(OSError):
    fileio.save_npz(old, embeddings=np.zeros((5, 3), np.float32))
  with pytest.raises(OSError):
    fileio.write_json(tmp_path / "index.json", {"bags": []})
  monkeypatch.undo()
  with np.load(old) as z:
    assert z["embeddings"].shape == (2, 3)
  assert not (tmp_path / "index.json").exists() and _no_temps(tmp_path)


_SLOW_WRITER = """
import sys, time
from slamags_jax.runtime import fileio
with fileio.atomic_open(sys.argv[1], "wb") as f:
  f.write(b"[" + b"0, " * 4_000_000)
  f.flush()
  print("half-written", flush=True)
  time.sleep(120)
  f.write(b"0]")
"""


@pytest.mark.e2e
def test_sigkill_in_the_middle_of_an_atomic_write(tmp_path):
  """A SIGKILL mid-write (no cleanup possible): the old file is intact, the rest a hidden temp."""
  work = tmp_path / "w"
  rc, err = _cli(["--config=configs/demo.py", "--config.stages=bags"], work, "bags")
  assert rc == 0, err
  manifest = work / "bags" / "manifest.json"
  before = manifest.read_bytes()
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(manifest)], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "half-written"
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert manifest.read_bytes() == before
  temps = [n for n in os.listdir(work / "bags") if fileio.is_temp_name(n)]
  assert len(temps) == 1 and os.path.getsize(work / "bags" / temps[0]) >= 12_000_000
  # The re-run trusts the complete manifest (bags stays done) and sweeps the temporary file.
  rc, err = _cli(["--config=configs/demo.py", "--config.stages=bags"], work, "again")
  assert rc == 0, err
  assert "stage bags: already complete" in err
  assert manifest.read_bytes() == before and os.listdir(work / "bags") == ["manifest.json"]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  fileio.append_jsonl(path, {"step": 1})
  with open(path, "a") as f:
    f.write('{"step": 2, "lo')  # a kill mid-append
  fileio.append_jsonl(path, {"step": 3})
  assert fileio.read_jsonl(path) == [{"step": 1}, {"step": 3}]


# Writes that are allowed to bypass fileio: (module, call) -> why.
_ALLOWED_WRITES = {
    ("report/figures.py", "savefig"): "renders into an in-memory buffer that fileio.write_bytes writes",
    ("runtime/workdir_lock.py", "open"): "the lock file is not an output: it is flocked in place (a rename would "
                                 "give a second run another file to lock)",
}


def _write_calls(tree: ast.AST):
  """(name, line) of calls that write files: open(.., 'w'/'a'/'x'/'+'), np.save*, savefig, json.dump, ..."""
  writers = {"save", "savez", "savez_compressed", "savetxt", "savefig", "dump", "to_csv", "to_json", "to_parquet",
             "write_text", "write_bytes", "tofile", "imsave", "imwrite"}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
    if name == "open" and owner in ("", "io", "os", "builtins"):
      mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
      if owner == "os" or (isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")):
        yield name, node.lineno
    elif name in writers and owner != "fileio":
      if name == "save" and owner not in ("np", "numpy", "jnp"):
        continue  # e.g. a checkpoint manager's save (orbax writes atomically)
      yield name, node.lineno


def test_every_output_write_goes_through_fileio():
  """An audit of slamags_jax/ and its subpackages: only fileio writes files directly (orbax does its own)."""
  pkg = os.path.join(REPO, "slamags_jax")
  found, seen = [], 0
  for folder, _, files in sorted(os.walk(pkg)):
    for fname in sorted(files):
      rel = os.path.relpath(os.path.join(folder, fname), pkg).replace(os.sep, "/")
      if not fname.endswith(".py") or rel == "runtime/fileio.py":
        continue
      seen += 1
      with open(os.path.join(folder, fname), encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for name, line in _write_calls(tree):
        if (rel, name) not in _ALLOWED_WRITES:
          found.append(f"{rel}:{line}: {name}")
  assert seen > 40, f"the audit read only {seen} modules"
  assert not found, "non-atomic writes (use slamags_jax.fileio): " + ", ".join(found)
