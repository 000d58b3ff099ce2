"""End to end on a slides fixture: both folds, the slide report, `predict` and the fold runner.

One module-scoped run of the whole pipeline per fold (in-process: the second fold reuses
the first's compilations; tiny model, 16 px cells, `random` encoder, 3 MIL epochs) on a
3-label slide set made from the in-repo sample; `predict` on fold 0's test slides must
give the run's own test probabilities.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import slide_set  # tests/ is on sys.path (pytest's rootdir-relative import of test modules)

from slamags_jax import predict
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.e2e  # every test uses the whole-pipeline runs (and CLIs in subprocesses)


def _config(overrides):
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for arg in overrides:
    key, value = arg[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from slamags_jax import main as main_lib
  base = tmp_path_factory.mktemp("slides")
  fx = slide_set.make_slide_set(str(base / "fx"))
  overrides = slide_set.tiny_overrides(fx) + ["--config.pretrain.method=random"]
  out = {"fx": fx, "overrides": overrides, "root": str(base / "folds")}
  for fold in range(2):
    work = os.path.join(out["root"], f"fold{fold}")
    main_lib.run(_config(overrides + [f"--config.bags.fold={fold}"]), work)
    out[fold] = work
  return out


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_slide_report_has_per_class_metrics_and_confusion(runs):
  s = fileio.read_json(os.path.join(runs[0], "report", "summary.json"))
  m = fileio.read_json(os.path.join(runs[0], "bags", "manifest.json"))
  test = [b for b in m["bags"] if b["split"] == "test"]
  assert s["labels"] == ["normal", "erb", "lym"] and s["n_test_bags"] == len(test) > 0
  assert sorted(s["per_class"]) == ["erb", "lym", "normal"]
  cm = np.asarray(s["confusion"])
  assert cm.shape == (3, 3) and cm.sum() == len(test)
  assert cm.sum(1).tolist() == [sum(b["label"] == c for b in test) for c in range(3)]
  assert np.isclose(s["bag_accuracy"], np.trace(cm) / cm.sum())
  assert 0.0 <= s["macro_f1"] <= 1.0 and s["bag_f1"] == s["macro_f1"]
  # Retrieval only on test slides with annotated witnesses (erb slides), none elsewhere.
  n_erb = sum(b["label_name"] == "erb" for b in test)
  assert s["retrieval_slides"] == n_erb and (s["retrieval_ap_mean"] is not None) == (n_erb > 0)
  rows = _csv(os.path.join(runs[0], "report", "cells.csv"))
  assert len(rows) == s["cells_csv_rows"] == sum(len(b["cells"]) for b in test)
  assert set(rows[0]) == {"slide_id", "label", "called", "path", "annotation", "attention_normal",
                          "attention_erb", "attention_lym", "rank"}
  assert len(s["galleries"]) == len(test) and all(
      os.path.exists(os.path.join(runs[0], "report", g)) for g in s["galleries"])
  # The interval (3 labels: a stratified bootstrap of the macro AUC), calibration and the review page.
  assert s["bag_auc_ci_method"].startswith("stratified bootstrap") and "brier" in s
  assert s["bag_auc_ci95"] is None or s["bag_auc_ci95"][0] <= s["bag_auc"] <= s["bag_auc_ci95"][1]
  page = open(os.path.join(runs[0], "report", s["report_html"]), encoding="utf-8").read()
  assert page.count('class="card') == len(test) and "Confusion matrix" in page
  idx = fileio.read_json(os.path.join(runs[0], "embeddings", "index.json"))
  assert idx["labels"] == s["labels"] and [e["id"] for e in idx["bags"]] == [b["id"] for b in m["bags"]]


def test_predict_reproduces_the_runs_test_probabilities(runs, tmp_path):
  m = fileio.read_json(os.path.join(runs[0], "bags", "manifest.json"))
  new = tmp_path / "new"
  new.mkdir()
  test_ids = sorted(b["id"] for b in m["bags"] if b["split"] == "test")
  for sid in test_ids:  # the run's test slides, as a user would hand them in: a plain folder copy
    shutil.copytree(os.path.join(runs["fx"]["root"], sid), new / sid)
  out = tmp_path / "pred"
  res = predict.predict_slides(runs[0], str(new), str(out), batch_size=5)  # other batches than the run's
  assert res["slides"] == len(test_ids)
  with np.load(os.path.join(runs[0], "mil", "predictions.npz")) as z:
    want = {str(b): z["probs"][i] for i, b in enumerate(z["bag_ids"]) if z["split"][i] == "test"}
  rows = _csv(out / "predictions.csv")
  assert [r["slide_id"] for r in rows] == test_ids
  labels = ["normal", "erb", "lym"]
  for r in rows:
    got = np.asarray([float(r[f"p_{n}"]) for n in labels])
    np.testing.assert_allclose(got, want[r["slide_id"]], atol=1e-6, rtol=0)
    assert r["called"] == labels[int(np.argmax(got))]
    assert int(r["cells"]) == sum(1 for b in m["bags"] if b["id"] == r["slide_id"] for _ in b["cells"])
  cells = _csv(out / "cells.csv")
  assert list(cells[0]) == ["slide_id", "path", "attention_normal", "attention_erb", "attention_lym", "rank"]
  for sid in test_ids:
    mine = [c for c in cells if c["slide_id"] == sid]
    assert sorted(int(c["rank"]) for c in mine) == list(range(1, len(mine) + 1))
    assert np.isclose(sum(float(c["attention_erb"]) for c in mine), 1.0, atol=1e-5)
    assert os.path.exists(out / "gallery" / f"{sid}.png")
  assert (out / "report.md").read_text().startswith("# Predictions")
  assert (out / "report.html").read_text().count('class="card') == len(test_ids)


def test_predict_on_a_cv_root_averages_the_fold_models(runs, tmp_path):
  outs = {}
  for name, work in (("fold0", runs[0]), ("fold1", runs[1]), ("root", runs["root"])):
    outs[name] = tmp_path / name
    res = predict.predict_slides(work, runs["fx"]["root"], str(outs[name]))
  assert res["folds"] == 2
  rows = {n: {r["slide_id"]: r for r in _csv(outs[n] / "predictions.csv")} for n in outs}
  labels = ["normal", "erb", "lym"]
  assert set(rows["root"]) == set(rows["fold0"]) and len(rows["root"]) == 12
  for sid, r in rows["root"].items():
    folds = [np.asarray([float(rows[f][sid][f"p_{n}"]) for n in labels]) for f in ("fold0", "fold1")]
    got = np.asarray([float(r[f"p_{n}"]) for n in labels])
    np.testing.assert_allclose(got, np.mean(folds, axis=0), atol=1e-6, rtol=0)
    np.testing.assert_allclose([float(r[f"fold1_p_{n}"]) for n in labels], folds[1], atol=1e-6, rtol=0)
    assert r["called"] == labels[int(np.argmax(got))]
  assert "fold ensemble of 2" in (outs["root"] / "report.md").read_text()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "slamags_jax.predict", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def _one_error(proc, needle):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert needle in lines[0] and "Traceback" not in proc.stderr, lines[0]


def test_predict_on_a_workdir_without_a_trained_mil_is_one_error(runs, tmp_path):
  work = tmp_path / "half"
  shutil.copytree(runs[1], work)
  shutil.rmtree(work / "mil")
  out = tmp_path / "pred"
  _one_error(_cli(f"--workdir={work}", f"--slides={runs['fx']['root']}", f"--out={out}"), "has no trained MIL")
  assert not out.exists()


@pytest.mark.parametrize("case", ["no-slide-folders", "too-few-cells", "missing-slides-folder"])
def test_predict_bad_slides_folder(runs, tmp_path, case):
  new = tmp_path / "new"
  new.mkdir()
  if case == "too-few-cells":
    shutil.copytree(os.path.join(runs["fx"]["root"], "s00"), new / "s00")
    (new / "tiny").mkdir()
    with pytest.raises(UserError, match=r"fewer than bags.min_cells=1 image files: 'tiny' \(0\)"):
      predict.predict_slides(runs[0], str(new), str(tmp_path / "pred"))
  elif case == "no-slide-folders":
    with pytest.raises(UserError, match="has no slide folders"):
      predict.predict_slides(runs[0], str(new), str(tmp_path / "pred"))
  else:
    with pytest.raises(UserError, match="--slides .* does not exist"):
      predict.predict_slides(runs[0], str(tmp_path / "nope"), str(tmp_path / "pred"))
  assert not (tmp_path / "pred").exists()


def test_fold_runner_skips_done_folds_and_writes_mean_and_std(runs, tmp_path):
  from tools import folds
  root = tmp_path / "cv"
  for fold in range(2):  # both folds done (the fixture's runs): resumed, nothing rerun
    shutil.copytree(runs[fold], root / f"fold{fold}")
  status = folds.main(["--config=configs/demo.py", f"--workdir={root}", *runs["overrides"],
                       "--config.pretrain.method=random"])
  assert status == 0
  rows = _csv(root / "folds.csv")
  assert [r["fold"] for r in rows] == ["0", "1"]
  accs = [fileio.read_json(os.path.join(runs[f], "report", "summary.json"))["bag_accuracy"] for f in range(2)]
  assert [float(r["accuracy"]) for r in rows] == pytest.approx(accs)
  md = (root / "folds.md").read_text()
  mean, std = np.mean(accs), np.std(accs)
  assert f"{mean:.3f} ± {std:.3f}" in md.splitlines()[-1] and "auc_erb" in md
  # The pooled out-of-fold numbers: every slide once, with the interval.
  oof = _csv(root / "oof.csv")
  assert sorted(r["slide_id"] for r in oof) == [f"s{i:02d}" for i in range(12)]
  pool = fileio.read_json(root / "oof.json")
  assert pool["n_slides"] == 12 and "Pooled out-of-fold" in md and "95 % CI" in md
  assert pool["bag_auc_ci95"] is None or pool["bag_auc_ci95"][0] <= pool["bag_auc"] <= pool["bag_auc_ci95"][1]
  # A fold whose run refuses its input stops the runner with that error (exit 2).
  proc = subprocess.run([sys.executable, "-m", "tools.folds", "--config=configs/demo.py",
                         f"--workdir={tmp_path / 'cv2'}", *runs["overrides"], "--config.data.negative_labels=healthy"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data.negative_labels"), \
      proc.stderr
