"""The GPU check's files agree: the carried set excludes the GPU machine's, the docs' command is run."""

from __future__ import annotations

import os
import re

import pytest

gpu_reqs = pytest.importorskip("tools.gpu_reqs", reason="needs tomllib (Python 3.11+, as on the GPU machine)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_constraints_pin_the_gpu_machine_versions_and_nothing_else_it_has(tmp_path):
  gpu_reqs.main(str(tmp_path), ["pytest"])
  have = set((tmp_path / "machine.txt").read_text().split())
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"} <= have
  assert not {"grain", "tensorflow-datasets", "array-record", "ml-collections"} & have
  pins = gpu_reqs.read_reqs(str(tmp_path / "constraints.txt"))
  assert "jax==0.11.2" in pins and "numpy==2.5.2" in pins
  # Only the GPU machine's own versions for what it has: never constraints.txt's jax.
  for pin in pins:
    if gpu_reqs.req_name(pin) in have:
      assert pin in gpu_reqs.read_reqs(os.path.join(ROOT, "launch", "gpu_machine.txt"))
  reqs = (tmp_path / "requirements.txt").read_text().split("\n")
  assert "pytest" in reqs and any(r.startswith("grain") for r in reqs)


def test_the_readme_command_is_the_one_the_dry_run_runs():
  with open(os.path.join(ROOT, "launch", "gpu_dryrun.sh")) as f:
    command = re.search(r"^GPU_COMMAND='([^']*)'", f.read(), re.MULTILINE).group(1)
  with open(os.path.join(ROOT, "launch", "README.md")) as f:
    readme = f.read()
  assert f"COMMIT=<the tree's commit> {command}\n" in readme
  assert len(command) < 2000
