"""The slides bag source: manifest, patient-level folds, and each bad input's one-line error."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
import slide_set  # tests/ is on sys.path (pytest's rootdir-relative import of test modules)

from slamags_jax import bags
from slamags_jax import config as config_lib
from slamags_jax.bags import slides as bags_slides
from slamags_jax.runtime.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def fx(tmp_path):
  return slide_set.make_slide_set(str(tmp_path / "fx"))


def _cfg(paths, **over):
  cfg = config_lib.get_base_config()
  cfg.bags.source = "slides"
  cfg.data.root = paths["root"]
  cfg.data.slides_csv = paths["csv"]
  cfg.data.cell_labels_csv = paths["cell_labels"]
  cfg.data.negative_labels = "normal"
  cfg.bags.folds = 2
  cfg.bags.val_fraction = 0.34
  for key, value in over.items():
    section, leaf = key.split("__")
    cfg[section][leaf] = value
  config_lib.validate(cfg)
  return cfg


def _rewrite_csv(path, rows, header=("slide_id", "label", "patient_id")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))[1:]


def test_manifest_one_bag_per_slide_with_labels_splits_and_witnesses(fx):
  m = bags_slides.build(_cfg(fx), "")
  assert m["source"] == "slides" and m["labels"] == ["normal", "erb", "lym"]  # negatives first, then sorted
  assert [b["id"] for b in m["bags"]] == [f"s{i:02d}" for i in range(12)]
  ids = [c for b in m["bags"] for c in b["cells"]]
  assert ids == list(range(len(m["cells"]))) == [c["id"] for c in m["cells"]]  # numbered slide by slide
  for b in m["bags"]:
    assert b["label"] == m["labels"].index(b["label_name"])
    assert b["positive"] == int(b["label_name"] != "normal")
    assert all(m["cells"][c]["path"].startswith(b["id"] + "/cells/") for c in b["cells"])
    assert b["k"] == (3 if b["label_name"] == "erb" else 0)  # the annotated erythroblasts are its witnesses
  assert m["annotated_cells"] == 16  # 3 witnesses + 1 normal cell on each erb slide
  assert {c["class"] for c in m["cells"]} == {"", "erb", "normal"}
  # Pretraining sees training slides only; positive = not a negative label.
  pos, neg = bags.pretrain_pools(m)
  train = [b for b in m["bags"] if b["split"] == "train"]
  assert set(pos) | set(neg) == {c for b in train for c in b["cells"]}
  assert set(neg) == {c for b in train if b["label_name"] == "normal" for c in b["cells"]}


def test_folds_are_patient_level_and_cover_every_slide_once(fx):
  test_of = {}
  for fold in range(2):
    m = bags_slides.build(_cfg(fx, bags__fold=fold), "")
    split_of = {b["id"]: b["split"] for b in m["bags"]}
    by_patient = {}
    for b in m["bags"]:
      by_patient.setdefault(b["patient_id"], set()).add(b["split"])
    assert all(len(s) == 1 for s in by_patient.values()), by_patient  # no patient in two splits
    assert {b["label_name"] for b in m["bags"] if b["split"] == "train"} == {"normal", "erb", "lym"}
    for sid, sp in split_of.items():
      if sp == "test":
        assert sid not in test_of
        test_of[sid] = fold
    assert m["settings"]["split_from"] == f"fold {fold} of 2"
  assert sorted(test_of) == [f"s{i:02d}" for i in range(12)]
  assert bags_slides.build(_cfg(fx), "")["bags"] == bags_slides.build(_cfg(fx), "")["bags"]  # deterministic


def test_split_column_is_used_when_given(fx):
  rows = _rows(fx["csv"])
  splits = ["train", "train", "val", "test"] * 3
  _rewrite_csv(fx["csv"], [r + [sp] for r, sp in zip(rows, splits)], ("slide_id", "label", "patient_id", "split"))
  # s00/s01 share patient p00 and are both train; s04/s05 (p02) too; s08/s09 (p04) too.
  m = bags_slides.build(_cfg(fx), "")
  assert [b["split"] for b in m["bags"]] == splits
  assert m["settings"]["split_from"] == "csv"


def _break(fx, kind):
  """Applies one bad input to the fixture; returns the needles of its error."""
  root, csv_path = fx["root"], fx["csv"]
  rows = _rows(csv_path)
  if kind == "row-without-folder":
    shutil.rmtree(os.path.join(root, "s03"))
    return ["have no folder", "s03 (line 5)"]
  if kind == "folder-without-row":
    os.makedirs(os.path.join(root, "zz_extra"))
    return ["no row in data.slides_csv", "'zz_extra'", "data.ignore_unlisted_slides"]
  if kind == "duplicate-id":
    _rewrite_csv(csv_path, rows + [["s02", "erb", "p99"]])
    return ["duplicate slide ids", "'s02' on lines 4, 14"]
  if kind == "label-missing-from-train":
    _rewrite_csv(csv_path, [r + [("test" if r[1] == "lym" else "train")] for r in rows],
                 ("slide_id", "label", "patient_id", "split"))
    return ["'lym'", "no slide in the training split"]
  if kind == "single-label":
    _rewrite_csv(csv_path, [[r[0], "normal", r[2]] for r in rows])
    return ["single label", "'normal'"]
  if kind == "too-few-cells":
    folder = os.path.join(root, "s07", "cells")
    for name in sorted(os.listdir(folder))[2:]:
      os.unlink(os.path.join(folder, name))
    return ["fewer than bags.min_cells=4 image files", "'s07' (2)"]
  if kind == "unknown-negative-label":
    return {"data__negative_labels": "healthy"}, ["data.negative_labels names 'healthy'", "erb, lym, normal"]
  if kind == "bad-split-value":
    _rewrite_csv(csv_path, [r + ["training"] for r in rows], ("slide_id", "label", "patient_id", "split"))
    return ["split must be train, val or test", "line(s) 2, 3"]
  if kind == "patient-in-two-splits":
    _rewrite_csv(csv_path, [r + [sp] for r, sp in zip(rows, ["train", "test"] + ["train", "val", "test"] * 4)],
                 ("slide_id", "label", "patient_id", "split"))
    return ["patient(s) 'p00'", "more than one split"]
  if kind == "missing-column":
    _rewrite_csv(csv_path, [r[:1] + r[2:] for r in rows], ("slide_id", "patient_id"))
    return ["has no column 'label'"]
  if kind == "unknown-annotated-cell":
    with open(fx["cell_labels"], "a") as f:
      f.write("s00/cells/nope.jpg,erb\n")
    return ["data.cell_labels_csv", "'s00/cells/nope.jpg'"]
  raise KeyError(kind)


BAD = ["row-without-folder", "folder-without-row", "duplicate-id", "label-missing-from-train", "single-label",
       "too-few-cells", "unknown-negative-label", "bad-split-value", "patient-in-two-splits", "missing-column",
       "unknown-annotated-cell"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_names_the_offending_rows_or_folders(fx, kind):
  got = _break(fx, kind)
  over, needles = got if isinstance(got, tuple) else ({}, got)
  with pytest.raises(UserError) as e:
    bags_slides.check(_cfg(fx, bags__min_cells=4, **over))
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_unlisted_folders_ignored_only_with_the_flag(fx):
  os.makedirs(os.path.join(fx["root"], "zz_extra"))
  m = bags_slides.build(_cfg(fx, data__ignore_unlisted_slides=True), "")
  assert "zz_extra" not in {b["id"] for b in m["bags"]}


def test_unreadable_images_are_skipped_and_named_then_min_cells_counts_readable(fx):
  folder = os.path.join(fx["root"], "s02", "cells")
  names = sorted(os.listdir(folder))
  for name in names[:2]:
    with open(os.path.join(folder, name), "wb") as f:
      f.write(b"not a jpeg")
  m = bags_slides.build(_cfg(fx), "")
  assert sorted(e["path"] for e in m["excluded"]) == [f"s02/cells/{n}" for n in names[:2]]
  assert len(m["bags"][2]["cells"]) == len(names) - 2
  with pytest.raises(UserError, match=r"fewer than bags.min_cells=7 readable images: 's02' \(6\)"):
    bags_slides.build(_cfg(fx, bags__min_cells=7), "")


@pytest.mark.e2e
def test_cli_bad_slides_input_is_one_error_line_and_nothing_written(fx, tmp_path):
  _break(fx, "duplicate-id")
  work = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "slamags_jax.main", "--config=configs/demo.py", f"--workdir={work}",
                         "--config.stages=bags", "--config.bags.source=slides", f"--config.data.root={fx['root']}",
                         f"--config.data.slides_csv={fx['csv']}", "--config.data.negative_labels=normal"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "duplicate slide ids" in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr and not work.exists()


def test_csv_with_train_and_test_only_gets_validation_slides_carved_from_train(fx):
  rows = _rows(fx["csv"])
  splits = [("test" if i % 4 == 3 else "train") for i in range(12)]
  _rewrite_csv(fx["csv"], [r + [sp] for r, sp in zip(rows, splits)], ("slide_id", "label", "patient_id", "split"))
  m = bags_slides.build(_cfg(fx, bags__val_fraction=0.34), "")
  got = [b["split"] for b in m["bags"]]
  assert [g for g, sp in zip(got, splits) if sp == "test"] == ["test"] * 3  # test slides untouched
  assert "val" in got and m["settings"]["split_from"].startswith("csv; validation carved")
  by_patient = {}
  for b in m["bags"]:
    by_patient.setdefault(b["patient_id"], set()).add(b["split"])
  assert all(len(s) == 1 for s in by_patient.values()), by_patient  # carved by patient
  assert {b["label_name"] for b in m["bags"] if b["split"] == "train"} == {"normal", "erb", "lym"}
  assert bags_slides.build(_cfg(fx, bags__val_fraction=0.34), "")["bags"] == m["bags"]  # deterministic
  # A CSV that names validation slides keeps them; val_fraction=0 carves nothing.
  m0 = bags_slides.build(_cfg(fx, bags__val_fraction=0.0), "")
  assert [b["split"] for b in m0["bags"]] == splits and m0["settings"]["split_from"] == "csv"


def test_carve_is_stratified_by_label():
  import numpy as np
  y = np.asarray([0] * 40 + [1] * 20)
  groups = np.asarray([f"p{i}" for i in range(60)])
  split = np.full(60, "train", dtype=object)
  n = bags_slides.carve_validation(split, y, groups, np.arange(60), 0.2, 7)
  assert n == 12 and sum(split[y == 0] == "val") == 8 and sum(split[y == 1] == "val") == 4


def test_no_validation_slides_is_refused_before_any_work_unless_last_epoch(fx):
  rows = _rows(fx["csv"])
  _rewrite_csv(fx["csv"], [r + [("test" if i % 4 == 3 else "train")] for i, r in enumerate(rows)],
               ("slide_id", "label", "patient_id", "split"))
  with pytest.raises(UserError, match="no validation slides.*mil.selection=last_epoch"):
    bags_slides.check(_cfg(fx, bags__val_fraction=0.0))
  bags_slides.check(_cfg(fx, bags__val_fraction=0.0, mil__selection="last_epoch"))
  cfg = _cfg(fx, bags__val_fraction=0.0)
  cfg.stages = "bags,pretrain,embed"  # no MIL: nothing to select
  bags_slides.check(cfg)
