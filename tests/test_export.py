"""`python -m slamags_jax.export`: files, key layouts, model card, errors (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from test_torchvision_io import encoder_of, random_variables

from slamags_jax import config as config_lib
from slamags_jax import export, mil
from slamags_jax.interop import torchvision as torchvision_io
from slamags_jax.runtime import checkpoints, fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(workdir: str, *, method="slam_ags", steps=6, with_mil=True, width=8, num_classes=0) -> dict:
  """A finished run's files as the stages write them (random weights; no training)."""
  v = random_variables(width=width, num_classes=num_classes)
  checkpoints.save_encoder(os.path.join(workdir, "pretrain", "encoder"), v)
  fileio.write_json(os.path.join(workdir, "pretrain", "summary.json"),
                    {"method": method, "steps": steps, "final_loss": 1.5})
  flat = config_lib.flatten(config_lib.get_base_config())
  cfg = {k: (list(x) if isinstance(x, tuple) else x) for k, x in flat.items()}
  cfg.update({"pretrain.method": method, "model.width": width, "model.head_dim": 16})
  fileio.write_json(os.path.join(workdir, "config.json"), cfg)
  fileio.write_json(os.path.join(workdir, "bags", "manifest.json"), {
      "format": "x", "root": "/data/cells", "seed": 0, "settings": {"bag_size": 4}, "excluded": [],
      "cells": [{"id": i} for i in range(8)],
      "bags": [{"split": "train", "label": 1}, {"split": "train", "label": 0}, {"split": "test", "label": 1}]})
  if with_mil:
    mil_cfg = config_lib.get_base_config().mil
    mil_cfg.unlock()
    mil_cfg.hidden_dim, mil_cfg.attention_dim, mil_cfg.n_prototypes = 8, 4, 2
    model = mil.make_model(mil_cfg)
    shapes = jax.eval_shape(
        lambda k: model.init({"params": k}, jnp.zeros((1, 1, 16)), jnp.ones((1, 1), bool))["params"], jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.25, np.float32), shapes)
    fit = mil.FitResult(params=params, last_params=params, best_epoch=3, selection="val auc", history=[{"epoch": 3}],
                        length=4, train_s=1.0, train_bags=2)
    meta = {**mil.io._model_meta(mil_cfg, 16), "input_mean": [0.5] * 16, "input_std": [2.0] * 16}
    mil.save_checkpoints(os.path.join(workdir, "mil", "checkpoints"), fit, meta)
    fileio.write_json(os.path.join(workdir, "mil", "summary.json"), {"test": {"auc": 0.75}})
  return v


def test_export_writes_torchvision_encoder_head_mil_and_card(tmp_path, capsys):
  run = str(tmp_path / "run")
  v = fake_run(run)
  out = tmp_path / "export" / "cells.safetensors"
  assert export.main([f"--workdir={run}", "--to=torchvision", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "note: model.width=8" in printed  # torchvision's resnet18() is width 64

  enc = load_file(str(out))
  assert "fc.weight" not in enc and len(enc) == 120  # resnet18's 122 keys less fc
  np.testing.assert_array_equal(enc["layer1.1.conv2.weight"],
                                np.transpose(v["params"]["encoder"]["layer1_1"]["conv2"]["kernel"], (3, 2, 0, 1)))
  assert enc["bn1.num_batches_tracked"].shape == () and int(enc["bn1.num_batches_tracked"]) == 6 * 2 * 2
  back = torchvision_io.encoder_from_torchvision(enc, encoder_of(v))
  assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, back, encoder_of(v))))
  with safe_open(str(out), framework="np") as f:
    assert f.metadata()["arch"] == "resnet18" and f.metadata()["format"] == "pt"

  head = load_file(str(tmp_path / "export" / "cells.head.safetensors"))
  assert sorted(head) == ["0.bias", "0.weight", "2.bias", "2.weight"]
  np.testing.assert_array_equal(head["2.weight"], np.asarray(v["params"]["head_fc2"]["kernel"]).T)

  mil_file = tmp_path / "export" / "cells.mil.safetensors"
  tensors = load_file(str(mil_file))
  assert {"fc.kernel", "prototypes", "classifier_0.gain", "input_mean", "input_std"} <= set(tensors)
  np.testing.assert_array_equal(tensors["input_std"], np.full(16, 2.0, np.float32))
  with safe_open(str(mil_file), framework="np") as f:
    assert json.loads(f.metadata()["mil"])["model"] == "pamil"

  card = json.load(open(tmp_path / "export" / "model_card.json"))
  assert card["model"]["arch"] == "resnet18" and card["model"]["width"] == 8 and card["model"]["method"] == "slam_ags"
  assert card["config"]["model.width"] == 8
  assert card["data"]["cells"] == 8 and card["data"]["bags"]["train"] == {"total": 2, "positive": 1}
  assert card["metrics"]["pretrain"]["final_loss"] == 1.5 and card["metrics"]["mil"]["test"]["auc"] == 0.75
  assert card["files"]["mil"]["meta"]["epoch"] == 3
  assert len(card["code"]["commit"]) == 40 and isinstance(card["code"]["dirty"], bool)  # tests run in a checkout
  for item in card["files"].values():
    assert item["sha256"] == hashlib.sha256(open(tmp_path / "export" / item["path"], "rb").read()).hexdigest()


def test_export_weakly_head_has_the_classifier_and_no_mil_without_the_stage(tmp_path):
  run = str(tmp_path / "run")
  fake_run(run, method="weakly", with_mil=False, num_classes=2)
  card = export.export(run, "torchvision", str(tmp_path / "e" / "enc.safetensors"))
  assert "mil" not in card["files"] and not (tmp_path / "e" / "enc.mil.safetensors").exists()
  assert sorted(load_file(str(tmp_path / "e" / "enc.head.safetensors")))[-2:] == ["3.bias", "3.weight"]


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  run = tmp_path / "run"
  out = tmp_path / "e" / "enc.safetensors"
  assert export.main([f"--workdir={run}", f"--out={out}"]) == 2
  assert capsys.readouterr().err.startswith("error: --workdir")
  run.mkdir()
  assert export.main([f"--workdir={run}", f"--out={out}"]) == 2
  assert "run the pretrain stage first" in capsys.readouterr().err
  fake_run(str(run), with_mil=False)
  assert export.main([f"--workdir={run}", "--to=onnx", f"--out={out}"]) == 2
  assert capsys.readouterr().err.strip() == "error: --to='onnx' is not supported; targets: torchvision"
  assert not (tmp_path / "e").exists()
  with pytest.raises(SystemExit) as e:
    export.main([f"--workdir={run}"])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the following arguments are required: --out")


@pytest.mark.e2e
def test_cli_entry_point(tmp_path):
  run = str(tmp_path / "run")
  fake_run(run, with_mil=False)
  out = tmp_path / "enc.safetensors"
  r = subprocess.run(
      [sys.executable, "-m", "slamags_jax.export", f"--workdir={run}", "--to=torchvision", f"--out={out}"],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert r.returncode == 0, r.stderr
  assert out.exists() and (tmp_path / "model_card.json").exists() and f"encoder: {out}" in r.stdout
