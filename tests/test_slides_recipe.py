"""configs/slides.py: the real-slides recipe validates and starts on a slide set (the study is in results/deepapl)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from slamags_jax import config as config_lib
from slamags_jax.runtime import fileio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slide_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe():
  spec = importlib.util.spec_from_file_location("slides_recipe", os.path.join(REPO, "configs", "slides.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_recipe_is_slides_cross_validation_with_validation_selection():
  cfg = _recipe()
  config_lib.validate(cfg)
  assert cfg.bags.source == "slides" and cfg.bags.folds == 5 and cfg.bags.val_fraction > 0
  assert cfg.mil.selection in ("val_auc", "val_loss")  # selected on validation patients, never the last epoch
  assert cfg.data.crop_size <= cfg.data.image_size


def test_recipe_builds_bags_with_validation_slides(tmp_path):
  fx = slide_set.make_slide_set(str(tmp_path / "fx"), per_label=6, patients=False)
  work = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "slamags_jax.main", "--config=configs/slides.py", f"--workdir={work}",
                         "--config.stages=bags", f"--config.data.root={fx['root']}",
                         f"--config.data.slides_csv={fx['csv']}", "--config.data.negative_labels=normal",
                         "--config.bags.folds=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  m = fileio.read_json(work / "bags" / "manifest.json")
  splits = [b["split"] for b in m["bags"]]
  assert splits.count("val") >= 1 and splits.count("test") >= 3
