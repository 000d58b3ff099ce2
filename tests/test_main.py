"""The CLI contract (issue #3): bad input ends with exit status 2 and one `error:` line.

Every case runs the real command in a subprocess and fails before any work (no model,
no XLA compilation), so each takes about a second. Errors found before any work must
leave nothing behind: the workdir is not created, or an existing one is not touched.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slamags_jax.runtime import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.e2e  # every test runs the CLI in a subprocess
DEMO = "--config=configs/demo.py"


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "slamags_jax.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def _assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit status 2, stderr exactly one line `error: ...` holding every needle, no traceback."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == 2, out
  assert "Traceback" not in out, out
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def _tree(folder) -> dict[str, bytes]:
  """Relative path -> bytes of every file below ``folder``."""
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--config.nope=1"], ["unknown config key 'nope'"], id="unknown-key"),
    pytest.param(["--config.bags.witnes_rate=0.2"], ["unknown config key 'bags.witnes_rate'", "bags.witness_rate"],
                 id="misspelled-key"),
    pytest.param(["--config.bags.witness_rate=0"], ["'bags.witness_rate'", "> 0"], id="witness-rate-0"),
    pytest.param(["--config.bags.witness_rate=1.5"], ["'bags.witness_rate'", "<= 1"], id="witness-rate-1.5"),
    pytest.param(["--config.bags.n_train=abc"], ["bags.n_train"], id="wrong-type-int"),
    pytest.param(["--config.bags.bag_size=2.5"], ["bags.bag_size"], id="float-for-int"),
    pytest.param(["--config.mil.standardize=maybe"], ["mil.standardize"], id="wrong-type-bool"),
    pytest.param(["--config.bags.n_train=3"], ["'bags.n_train'", "even"], id="odd-bag-count"),
    pytest.param(["--config.pretrain.epochs=-1"], ["'pretrain.epochs'"], id="negative-epochs"),
    pytest.param(["--config.pretrain.method=byol"], ["'pretrain.method'", "slam_ags"], id="unknown-method"),
    pytest.param(["--config.stages=bags,train"], ["'stages'", "'train'"], id="unknown-stage"),
    pytest.param(["--config.data.crop_size=64"], ["'data.crop_size'"], id="crop-larger-than-image"),
    pytest.param(["--config.data.root=/nonexistent/cells"], ["data root '/nonexistent/cells' does not exist"],
                 id="missing-data-root"),
    pytest.param(["--config.data.root="], ["data.root is empty"], id="empty-data-root"),
    pytest.param(["--config.data.abnormal_classes=blast"], ["class 'blast' has no folder", "erythroblast"],
                 id="unknown-class"),
    pytest.param(["--config.stages=pretrain"], ["stage 'pretrain' needs the output of stage 'bags'"],
                 id="stage-without-its-input"),
    pytest.param(["extra"], ["unexpected arguments: extra"], id="positional-argument"),
])
def test_bad_input_is_one_error_line_before_any_work(tmp_path, args, needles):
  work = tmp_path / "run"
  _assert_one_error(_cli(DEMO, f"--workdir={work}", "--config.stages=bags", *args), *needles)
  assert not work.exists()


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--workdir={work}"], ["--config is required"], id="missing-config"),
    pytest.param(["--config=configs/nope.py", "--workdir={work}"], ["config file 'configs/nope.py' not found"],
                 id="missing-config-file"),
    pytest.param(["--config=configs/nope.py", "--workdir={work}", "--config.seed=1"], ["not found"],
                 id="missing-config-file-with-override"),
    pytest.param(["--config=", "--workdir={work}"], ["--config is empty"], id="empty-config"),
    pytest.param([DEMO], ["--workdir is required"], id="missing-workdir"),
    pytest.param([DEMO, "--workdir={work}", "--bogus=1"], ["bogus"], id="unknown-flag"),
])
def test_bad_flags_are_one_error_line(tmp_path, args, needles):
  work = tmp_path / "run"
  _assert_one_error(_cli(*(a.format(work=work) for a in args)), *needles)
  assert not work.exists()


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a folder")
  _assert_one_error(_cli(DEMO, f"--workdir={path}"), "is not a folder")
  assert path.read_text() == "not a folder"


@pytest.fixture
def bags_workdir(tmp_path):
  """A workdir whose bags stage is complete (the only stage that needs no model)."""
  work = tmp_path / "run"
  proc = _cli(DEMO, f"--workdir={work}", "--config.stages=bags")
  assert proc.returncode == 0, proc.stderr
  assert (work / "bags" / "manifest.json").exists() and (work / "config.json").exists()
  return work


def test_workdir_made_with_other_settings(bags_workdir):
  work = bags_workdir
  before = _tree(work)
  line = _assert_one_error(_cli(DEMO, f"--workdir={work}", "--config.stages=bags", "--config.bags.n_train=20"),
                           "stage 'bags'", "bags.n_train=200, now 20", "new --workdir")
  assert os.path.join(str(work), "bags") in line
  assert _tree(work) == before  # config.json not rewritten, manifest untouched
  # Settings that change how a run goes, not what it makes, are fine; the stage is skipped.
  proc = _cli(DEMO, f"--workdir={work}", "--config.stages=bags", "--config.pretrain.log_every_steps=3",
              "--config.data.workers=1")
  assert proc.returncode == 0, proc.stderr
  assert "stage bags: already complete" in proc.stderr
  assert _tree(work)["bags/manifest.json"] == before["bags/manifest.json"]


def test_pretraining_checkpoints_made_with_other_settings(bags_workdir):
  """A re-run would continue these checkpoints: other pretraining settings would mix two runs."""
  work = bags_workdir
  os.makedirs(work / "pretrain" / "checkpoints" / "4")
  before = _tree(work)
  _assert_one_error(_cli(DEMO, f"--workdir={work}", "--config.stages=bags,pretrain", "--config.pretrain.lr=0.01"),
                    "stage 'pretrain'", "has checkpoints", "pretrain.lr=0.003, now 0.01")
  assert _tree(work) == before
  # An orbax temporary folder alone is no checkpoint: nothing to continue, nothing to refuse.
  os.rename(work / "pretrain" / "checkpoints" / "4", work / "pretrain" / "checkpoints" / "4.orbax-checkpoint-tmp-1")
  proc = _cli(DEMO, f"--workdir={work}", "--config.stages=bags", "--config.pretrain.lr=0.01")
  assert proc.returncode == 0, proc.stderr


def test_completed_stage_after_an_unfinished_one(bags_workdir):
  """Outputs made from a stage that is gone (or being redone) are not silently reused."""
  work = bags_workdir
  fileio.write_json(work / "embeddings" / "index.json", {"bags": []})
  _assert_one_error(_cli(DEMO, f"--workdir={work}", "--config.stages=bags"),
                    "stage 'embed' is complete", "'pretrain'", "remove")
