"""The PBC-ERB sweep launcher and results script, with a fake runner (no training).

What must hold: recorded runs are not re-run, rows of other settings (or of uncommitted
code) never count as done, the CSV keeps issue #9's column order and never tears, a
failed run records nothing, aggregation is mean / sample std / n per cell, and
regenerating the README keeps its hand-written text.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from tools.pbc_erb import results as results_lib
from tools.pbc_erb import select as select_lib
from tools.pbc_erb import sweep as sweep_lib

REQUIRED = ("method, witness_rate, seed, bag_f1, bag_auc, bag_accuracy, topk_k, topk_found_mean, recall_at_k_mean, "
            "retrieval_ap_mean, final_effective_rank, conflict_fraction, mean_task_cosine, pretrain_wall_s, "
            "total_wall_s, commit, machine").split(", ")


@pytest.fixture(autouse=True)
def _restore_sigterm():
  """sweep_lib.main installs its SIGTERM handler while it runs, and puts the previous one back."""
  import signal
  before = signal.getsignal(signal.SIGTERM)
  yield
  assert signal.getsignal(signal.SIGTERM) is before
  signal.signal(signal.SIGTERM, before)


def _arg(cmd, prefix):
  return next(a[len(prefix):] for a in cmd if a.startswith(prefix))


class FakeRunner:
  """Stands in for ``run_command``: writes the summaries a real run would, or fails."""

  def __init__(self, fail_methods=(), wall=2.5):
    self.calls = []
    self.fail_methods = set(fail_methods)
    self.wall = wall

  def __call__(self, cmd, log_path):
    workdir = _arg(cmd, "--workdir=")
    method = _arg(cmd, "--config.pretrain.method=")
    wr = float(_arg(cmd, "--config.bags.witness_rate="))
    seed = int(_arg(cmd, "--config.seed="))
    self.calls.append((method, wr, seed))
    with open(log_path, "a") as f:
      f.write("fake run\n")
    if method in self.fail_methods:
      return 1, self.wall
    for marker in sweep_lib.STAGE_MARKERS.values():
      os.makedirs(os.path.dirname(os.path.join(workdir, marker)), exist_ok=True)
    two_task = method in ("slam_ags", "weaksupcon", "pcgrad")
    with open(os.path.join(workdir, "pretrain", "summary.json"), "w") as f:
      json.dump({"method": method, "steps": 30, "wall_s": 11.0, "final_effective_rank": 9.5,
                 "conflict_fraction": 0.25 if two_task else None,
                 "mean_task_cosine": 0.1 if two_task else None}, f)
    with open(os.path.join(workdir, "report", "summary.json"), "w") as f:
      json.dump({"method": method, "witness_rate": wr, "seed": seed, "bag_f1": 0.5 + seed / 10, "bag_auc": 0.7,
                 "bag_accuracy": 0.6, "topk_k": 20, "topk_found_mean": 3.0, "recall_at_k_mean": 0.3 + seed / 100,
                 "retrieval_ap_mean": 0.2, "random_recall_at_k_mean": 0.1, "random_ap_mean": wr,
                 "mil_best_epoch": 7}, f)
    for marker in ("bags/manifest.json", "embeddings/index.json", "mil/summary.json"):
      with open(os.path.join(workdir, marker), "w") as f:
        f.write("{}")
    return 0, self.wall


def _sweep(tmp_path, monkeypatch, runner, *, methods=("slam_ags", "random"), wrs=(0.1,), seeds=(0, 1),
           digest="aaaa", dirty=False):
  monkeypatch.setattr(sweep_lib, "run_command", runner)
  lines = []
  out = sweep_lib.sweep(sweep_lib.plan(methods, wrs, seeds), config_path="configs/pbc_erb.py", overrides=(),
                        csv_path=str(tmp_path / "runs.csv"), root=str(tmp_path / "w"), digest=digest,
                        commit="c0ffee", dirty=dirty, machine="test machine, 2 cores", out=lines.append)
  return out, lines


def _rows(tmp_path):
  return sweep_lib.read_rows(str(tmp_path / "runs.csv"))


def test_csv_columns_start_with_the_required_ones_in_order(tmp_path, monkeypatch):
  assert list(sweep_lib.COLUMNS[:len(REQUIRED)]) == REQUIRED
  _sweep(tmp_path, monkeypatch, FakeRunner(), methods=("slam_ags",), seeds=(0,))
  with open(tmp_path / "runs.csv", newline="") as f:
    header, row = list(csv.reader(f))
  assert header == list(sweep_lib.COLUMNS)
  rec = dict(zip(header, row))
  assert rec["method"] == "slam_ags" and rec["witness_rate"] == "0.1" and rec["seed"] == "0"
  assert rec["pretrain_wall_s"] == "11.0" and rec["total_wall_s"] == "2.5" and rec["commit"] == "c0ffee"
  assert rec["conflict_fraction"] == "0.25" and rec["stages_run"] == "bags,pretrain,embed,mil,report"


def test_recorded_runs_are_skipped_and_other_settings_do_not_count(tmp_path, monkeypatch):
  runner = FakeRunner()
  out, _ = _sweep(tmp_path, monkeypatch, runner)
  assert len(runner.calls) == 4 and len(out.ran) == 4 and len(_rows(tmp_path)) == 4
  out, _ = _sweep(tmp_path, monkeypatch, runner)  # the same sweep again: nothing to do
  assert len(runner.calls) == 4 and len(out.skipped) == 4 and len(_rows(tmp_path)) == 4
  out, _ = _sweep(tmp_path, monkeypatch, runner, seeds=(0, 1, 2))  # one more seed: only it runs
  assert runner.calls[4:] == [("slam_ags", 0.1, 2), ("random", 0.1, 2)]
  out, _ = _sweep(tmp_path, monkeypatch, runner, digest="bbbb")  # new settings: everything again
  assert len(runner.calls) == 10 and len(_rows(tmp_path)) == 10
  assert {r["settings_hash"] for r in _rows(tmp_path)} == {"aaaa", "bbbb"}
  # Settings get their own workdirs, so main never sees a workdir made with other settings.
  assert os.path.isdir(tmp_path / "w" / "aaaa" / "slam_ags" / "wr10" / "seed0")
  assert os.path.isdir(tmp_path / "w" / "bbbb" / "slam_ags" / "wr10" / "seed0")


def test_dirty_rows_do_not_count_for_a_clean_sweep(tmp_path, monkeypatch):
  runner = FakeRunner()
  _sweep(tmp_path, monkeypatch, runner, seeds=(0,), dirty=True)
  assert {r["dirty"] for r in _rows(tmp_path)} == {"1"}
  _sweep(tmp_path, monkeypatch, runner, seeds=(0,), dirty=True)
  assert len(runner.calls) == 2  # a dirty sweep counts dirty rows
  _sweep(tmp_path, monkeypatch, runner, seeds=(0,), dirty=False)
  assert len(runner.calls) == 4  # a clean sweep does not
  assert [r["dirty"] for r in _rows(tmp_path)] == ["1", "1", "0", "0"]


def test_failed_run_records_nothing_and_the_sweep_goes_on(tmp_path, monkeypatch):
  out, lines = _sweep(tmp_path, monkeypatch, FakeRunner(fail_methods={"slam_ags"}))
  assert [r["method"] for r in _rows(tmp_path)] == ["random", "random"]
  assert len(out.failed) == 2 and "exit 1" in out.failed[0]
  assert any("FAILED" in line and "fake run" in line for line in lines)  # the log's tail is shown


def test_main_exits_nonzero_after_failures(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep_lib, "run_command", FakeRunner(fail_methods={"random"}))
  monkeypatch.setattr(sweep_lib, "git_state", lambda path: ("c0ffee", []))
  monkeypatch.setattr(sweep_lib, "machine_description", lambda python: "test machine")
  rc = sweep_lib.main(["--methods", "slam_ags,random", "--witness-rates", "10%", "--seeds", "0",
                       "--csv", str(tmp_path / "runs.csv"), "--workdir-root", str(tmp_path / "w"),
                       "--set", "data.root=/nonexistent-pbc"])
  assert rc == 1
  (row,) = _rows(tmp_path)
  assert row["method"] == "slam_ags" and row["machine"] == "test machine"
  digest = row["settings_hash"]
  saved = json.loads((tmp_path / "settings" / f"{digest}.json").read_text())
  assert saved["settings"]["model.width"] == 16 and "seed" not in saved["settings"]


def test_main_refuses_a_dirty_tree(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sweep_lib, "git_state", lambda path: ("c0ffee", ["slamags_jax/pretrain.py"]))
  runner = FakeRunner()
  monkeypatch.setattr(sweep_lib, "run_command", runner)
  rc = sweep_lib.main(["--methods", "random", "--witness-rates", "0.1", "--seeds", "0",
                       "--csv", str(tmp_path / "runs.csv"), "--workdir-root", str(tmp_path / "w")])
  assert rc == 2 and not runner.calls and "slamags_jax/pretrain.py" in capsys.readouterr().err


def test_resumed_run_records_its_invocations(tmp_path, monkeypatch):
  job = sweep_lib.Job("random", 0.1, 0)
  workdir = sweep_lib.workdir_of(str(tmp_path / "w"), "aaaa", job)
  os.makedirs(os.path.join(workdir, "bags"))
  with open(os.path.join(workdir, "bags", "manifest.json"), "w") as f:
    f.write("{}")  # a killed earlier invocation got as far as the bags
  with open(os.path.join(workdir, "sweep_invocations.jsonl"), "w") as f:
    f.write(json.dumps({"wall_s": 40.0, "exit": -9}) + "\n")
  _sweep(tmp_path, monkeypatch, FakeRunner(wall=5.0), methods=("random",), seeds=(0,))
  (row,) = _rows(tmp_path)
  assert row["invocations"] == "2" and float(row["total_wall_s_all"]) == 45.0 and row["total_wall_s"] == "5.0"
  assert row["stages_run"] == "pretrain,embed,mil,report"


def test_settings_hash_follows_results_not_operations(tmp_path):
  config = os.path.join(sweep_lib.REPO, "configs", "pbc_erb.py")
  digest = lambda *o: sweep_lib.settings_hash(sweep_lib.settings_of(sweep_lib.load_config(config, o)))  # noqa: E731
  base = digest()
  own_lr = sweep_lib.load_config(config, ()).pretrain.lr
  assert digest(("pretrain.lr", repr(own_lr))) == base  # the config's own value
  assert digest(("pretrain.lr", repr(own_lr * 2))) != base
  assert digest(("model.width", "32")) != base
  assert digest(("data.workers", "2"), ("pretrain.log_every_steps", "10")) == base
  # The data folder counts by content (SHA256SUMS), not by path.
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "SHA256SUMS").write_text("abc  x/1.jpg\n")
  assert digest(("data.root", str(tmp_path / "a"))) == digest(("data.root", str(tmp_path / "b")))
  (tmp_path / "b" / "SHA256SUMS").write_text("def  x/1.jpg\n")
  assert digest(("data.root", str(tmp_path / "a"))) != digest(("data.root", str(tmp_path / "b")))
  for key in ("seed", "pretrain.method", "bags.witness_rate", "stages"):
    with pytest.raises(sweep_lib.UserError):
      sweep_lib.parse_set([f"{key}=1"])


def test_csv_append_keeps_old_bytes_and_survives_a_torn_line(tmp_path):
  path = str(tmp_path / "runs.csv")
  row = {c: None for c in sweep_lib.COLUMNS} | {"method": "random", "witness_rate": "0.1", "seed": 0,
                                                 "machine": "x86, 2 cores", "settings_hash": "aaaa"}
  sweep_lib.append_row(path, row)
  with open(path) as f:
    first = f.read()
  with open(path, "a") as f:
    f.write("slam_ags,0.1,1,0.5")  # a line torn by a crash in some other writer
  warnings = []
  assert len(sweep_lib.read_rows(path, warnings.append)) == 1 and warnings
  sweep_lib.append_row(path, row | {"seed": 2})
  with open(path) as f:
    text = f.read()
  assert text.startswith(first) and text.endswith("\n")
  rows = sweep_lib.read_rows(path)
  assert [r["seed"] for r in rows] == ["0", "2"] and rows[0]["machine"] == "x86, 2 cores"
  with open(path, "w") as f:
    f.write(",".join(sweep_lib.REQUIRED_COLUMNS) + ",old_extra\n")
  with pytest.raises(sweep_lib.UserError):
    sweep_lib.append_row(path, row)
  with pytest.raises(sweep_lib.UserError):  # a sweep refuses before running anything
    sweep_lib.check_header(path)


def test_append_row_migrates_an_older_header(tmp_path):
  """A CSV from before the appended columns gets today's header; old rows keep their cells."""
  path = str(tmp_path / "runs.csv")
  n_old = sweep_lib.COLUMNS.index("val_bag_auc")  # the columns of the CSVs recorded before issue #15
  old_cols = sweep_lib.COLUMNS[:n_old]
  old_row = ["slam_ags", "0.1", "0"] + ["1"] * (n_old - 3)
  with open(path, "w") as f:
    f.write(",".join(old_cols) + "\n" + ",".join(old_row) + "\n")
  sweep_lib.check_header(path)  # accepted: columns only grew at the end
  new = {c: "" for c in sweep_lib.COLUMNS} | {"method": "simclr", "witness_rate": "0.1", "seed": "1",
                                                "val_bag_auc": "0.75"}
  sweep_lib.append_row(path, new)
  rows = sweep_lib.read_rows(path)
  assert [r["method"] for r in rows] == ["slam_ags", "simclr"]
  assert rows[0][old_cols[-1]] == "1" and rows[0]["val_bag_auc"] == "" and rows[1]["val_bag_auc"] == "0.75"
  with open(path) as f:
    assert f.readline().rstrip("\n") == ",".join(sweep_lib.COLUMNS)


def _row(method, wr, seed, f1, digest="aaaa", dirty="0", **kw):
  r = {c: "" for c in sweep_lib.COLUMNS}
  r.update(method=method, witness_rate=str(wr), seed=str(seed), bag_f1=str(f1), recall_at_k_mean="0.5",
           topk_k="20", commit="c0ffee", machine="m", settings_hash=digest, dirty=dirty, **kw)
  return r


def test_aggregation_mean_std_n_and_selection():
  rows = [_row("slam_ags", 0.1, s, f) for s, f in ((0, 0.5), (1, 0.7), (2, 0.9))]
  rows += [_row("random", 0.1, 0, 0.1), _row("random", 0.1, 0, 0.3)]  # seed 0 twice: the latest counts
  rows += [_row("random", 0.1, 1, 0.9, digest="bbbb"), _row("random", 0.1, 2, 0.9, dirty="1")]
  kept, info = results_lib.select(rows, "aaaa", include_dirty=False)
  assert info["duplicates"] == 1 and info["dirty_left_out"] == 1 and info["other_hashes"] == {"bbbb": 1}
  agg = results_lib.aggregate(kept, "bag_f1")
  m, s, n = agg[("slam_ags", "0.1")]
  assert n == 3 and m == pytest.approx(0.7) and s == pytest.approx(0.2)  # sample std (ddof 1)
  m, s, n = agg[("random", "0.1")]
  assert n == 1 and m == pytest.approx(0.3) and math.isnan(s)
  d = results_lib.paired_difference(kept, "bag_f1", "slam_ags", "random", "0.1")
  assert d[0] == pytest.approx(0.2) and d[2] == 1  # only seed 0 is shared
  assert results_lib.fmt_ms(0.7, 0.2, 3, 3) == "0.700 ± 0.200"
  assert results_lib.fmt_ms(0.3, math.nan, 1, 3) == "0.300 (1 seed)"
  missing = results_lib.missing_cells(kept, 3)
  assert "random @ 10 %: 1 seed" in missing and not any(m.startswith("slam_ags @ 10 %") for m in missing)
  assert len(missing) == len(sweep_lib.METHODS) * 5 - 1  # every (method, WR) cell but one


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=sweep_lib.COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)


def test_readme_regeneration_keeps_hand_written_text_and_warns(tmp_path, capsys):
  rows = [_row(m, wr, s, 0.5 + s / 10, random_recall_at_k_mean="0.1")
          for m in ("slam_ags", "weaksupcon") for wr in (0.1, 0.01) for s in (0, 1, 2)]
  _write_csv(tmp_path / "runs.csv", rows)
  out = tmp_path / "out"
  out.mkdir()
  (out / "README.md").write_text("# Mine\n\nHand-written reading.\n\n" + results_lib.BEGIN + "\nold stuff\n"
                                 + results_lib.END + "\n\nFooter by hand.\n")
  args = ["--csv", str(tmp_path / "runs.csv"), "--out", str(out), "--settings-hash", "aaaa"]
  assert results_lib.main(args) == 0
  text = (out / "README.md").read_text()
  assert text.startswith("# Mine\n\nHand-written reading.\n") and text.endswith("\n\nFooter by hand.\n")
  assert "old stuff" not in text and "0.600 ± 0.100" in text and "**slam_ags**" in text
  assert "- `pcgrad`: 10 %: 0, 5 %: 0, 2 %: 0, 1 %: 0, 0.5 %: 0\n" in text  # missing cells in the README ...
  assert "- `slam_ags`: 5 %: 0, 2 %: 0, 0.5 %: 0\n" in text
  assert "fewer than 3 seeds" in capsys.readouterr().err  # ... and warned about
  for png in ("f1_vs_wr.png", "recall_vs_wr.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert results_lib.main(args) == 0 and (out / "README.md").read_text() == text  # regeneration is stable
  (out / "README.md").write_text("no markers here\n")
  assert results_lib.main(args) == 2


def test_results_start_from_the_skeleton_without_rows(tmp_path):
  out = tmp_path / "out"
  assert results_lib.main(["--csv", str(tmp_path / "none.csv"), "--out", str(out), "--settings-hash", "aaaa"]) == 0
  text = (out / "README.md").read_text()
  assert "## Reading of the results" in text and "No runs recorded yet" in text
  assert not (out / "f1_vs_wr.png").exists()


def test_tuning_table_compares_settings_pooled_over_methods(tmp_path, capsys):
  rows = [_row(m, 0.1, 0, f1, digest=h, pretrain_wall_s=w, finished_utc=t)
          for h, f1, w, t in (("aaaa", 0.6, "50", "1"), ("bbbb", 0.8, "110", "2")) for m in ("slam_ags", "simclr")]
  _write_csv(tmp_path / "runs.csv", rows)
  for h, epochs in (("aaaa", 2), ("bbbb", 4)):
    (tmp_path / "settings").mkdir(exist_ok=True)
    settings = {"settings": {"pretrain.epochs": epochs, "model.width": 16}}
    (tmp_path / "settings" / f"{h}.json").write_text(json.dumps(settings))
  assert results_lib.main(["--csv", str(tmp_path / "runs.csv"), "--tuning-table"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[2].startswith("| `aaaa` | pretrain.epochs=2 | 2 (slam_ags, simclr) | 50 / 50 | 0.600 ± 0.000")
  assert lines[3].startswith("| `bbbb` | pretrain.epochs=4 |") and "model.width" not in lines[3]


def _selection_rows(tmp_path):
  """Two methods x the three grid points at WR 1 % and 10 %, seed 0; settings files beside the CSV."""
  (tmp_path / "settings").mkdir(exist_ok=True)
  rows = []
  # (val AUC at 1 %, at 10 %, val AP) per grid point; test-bag AUC set opposite, so a choice on it would differ.
  scores = {"slam_ags": ((0.6, 0.9, 0.3), (0.7, 0.9, 0.2), (0.5, 0.5, 0.9)),
            "simclr": ((0.6, 0.8, 0.2), (0.8, 0.6, 0.4), (0.5, 0.5, 0.1))}
  for i, (lr,) in enumerate(p[0][1:] for p in select_lib.candidates()):
    digest = f"h{i}"
    (tmp_path / "settings" / f"{digest}.json").write_text(json.dumps(
        {"settings": {"pretrain.lr": float(lr)}, "overrides": [f"pretrain.lr={lr}"]}))
    for m, per in scores.items():
      a1, a10, ap = per[i]
      for wr, auc in ((0.01, a1), (0.1, a10)):
        rows.append(_row(m, wr, 0, 0.5, digest=digest, val_bag_auc=str(auc), val_retrieval_ap_mean=str(ap),
                         bag_auc=str(1 - auc)))
  return rows


def test_selection_chooses_on_validation_bags_with_the_tie_rule(tmp_path, monkeypatch):
  monkeypatch.setattr(select_lib, "GRID", {"pretrain.lr": ("0.003", "0.01", "0.001")})
  rows = _selection_rows(tmp_path)
  rows.append(_row("weakly", 0.01, 0, 0.5, digest="h0", val_bag_auc="0.9"))  # WR 10 % missing: no candidate
  _write_csv(tmp_path / "selection.csv", rows)
  out = tmp_path / "selection.json"
  assert select_lib.main(["choose", "--csv", str(tmp_path / "selection.csv"), "--json", str(out),
                          "--methods", "slam_ags,simclr,weakly"]) == 0
  sel = json.loads(out.read_text())
  lrs = [p[0][1] for p in select_lib.candidates()]
  # slam_ags: mean val AUC 0.75, 0.80, 0.50 -> candidate 1 (candidate 2's best val AP does not matter).
  assert sel["methods"]["slam_ags"]["chosen"] == [f"pretrain.lr={lrs[1]}"]
  assert sel["methods"]["slam_ags"]["settings_hash"] == "h1"
  # simclr: candidates 0 and 1 both at 0.7 mean val AUC: the higher val AP (0.4) wins.
  assert sel["methods"]["simclr"]["chosen"] == [f"pretrain.lr={lrs[1]}"]
  assert sel["methods"]["weakly"]["chosen"] is None
  assert len(sel["methods"]["slam_ags"]["candidates"]) == 3 and sel["methods"]["slam_ags"]["complete"]
  table = (tmp_path / "selection.md").read_text()
  assert table.count("**chosen**") == 2 and "no complete candidate" in table


def test_sweep_runs_each_method_with_its_chosen_setting(tmp_path, monkeypatch, capsys):
  config = os.path.join(sweep_lib.REPO, "configs", "pbc_erb.py")
  digest = lambda lr: sweep_lib.settings_hash(sweep_lib.settings_of(  # noqa: E731
      sweep_lib.load_config(config, [("pretrain.lr", lr)])))
  sel = {"methods": {"slam_ags": {"chosen": ["pretrain.lr=0.01"], "settings_hash": digest("0.01")},
                     "random": {"chosen": ["pretrain.lr=0.003"], "settings_hash": digest("0.003")}}}
  (tmp_path / "sel.json").write_text(json.dumps(sel))
  runner = FakeRunner()
  monkeypatch.setattr(sweep_lib, "run_command", runner)
  monkeypatch.setattr(sweep_lib, "git_state", lambda path: ("c0ffee", []))
  monkeypatch.setattr(sweep_lib, "machine_description", lambda python: "test machine")
  args = ["--methods", "slam_ags,random", "--witness-rates", "0.1", "--seeds", "0,1", "--selection",
          str(tmp_path / "sel.json"), "--csv", str(tmp_path / "runs.csv"), "--workdir-root", str(tmp_path / "w")]
  assert sweep_lib.main(args) == 0
  rows = _rows(tmp_path)
  assert [(r["method"], r["seed"]) for r in rows] == [("slam_ags", "0"), ("random", "0"), ("slam_ags", "1"),
                                                      ("random", "1")]  # seed-major across methods
  assert {r["method"]: r["settings_hash"] for r in rows} == {"slam_ags": digest("0.01"), "random": digest("0.003")}
  # The results script reports each method's chosen hash (selection.json beside the CSV by default).
  (tmp_path / "selection.json").write_text(json.dumps(sel))
  out = tmp_path / "out"
  assert results_lib.main(["--csv", str(tmp_path / "runs.csv"), "--out", str(out), "--min-seeds", "2"]) == 0
  text = (out / "README.md").read_text()
  assert "Rows used: 4 (settings `per method, selection.json`)" in text and "`pretrain.lr=0.01`" in text
  sel["methods"]["slam_ags"]["settings_hash"] = "stale"
  (tmp_path / "sel.json").write_text(json.dumps(sel))
  capsys.readouterr()
  assert sweep_lib.main(args) == 2 and "run the selection again" in capsys.readouterr().err


def test_keys_added_later_leave_recorded_settings_hashes_alone():
  """augment.on_device at False (what every recorded row ran) is not in the settings: their hashes stay."""
  config = os.path.join(sweep_lib.REPO, "configs", "pbc_erb.py")
  off = sweep_lib.settings_of(sweep_lib.load_config(config, ()))
  assert "augment.on_device" not in off
  on = sweep_lib.settings_of(sweep_lib.load_config(config, (("augment.on_device", "True"),)))
  assert on.pop("augment.on_device") is True and on == off


def test_selection_runs_of_the_chosen_setting_are_taken_over_not_rerun(tmp_path, monkeypatch):
  config = os.path.join(sweep_lib.REPO, "configs", "pbc_erb.py")
  digest = sweep_lib.settings_hash(sweep_lib.settings_of(sweep_lib.load_config(config, [("pretrain.lr", "0.01")])))
  _write_csv(tmp_path / "selection.csv", [_row("slam_ags", 0.1, 0, 0.77, digest=digest, val_bag_auc="0.9"),
                                          _row("slam_ags", 0.1, 1, 0.5, digest="other")])
  (tmp_path / "sel.json").write_text(json.dumps(
      {"methods": {"slam_ags": {"chosen": ["pretrain.lr=0.01"], "settings_hash": digest}}}))
  runner = FakeRunner()
  monkeypatch.setattr(sweep_lib, "run_command", runner)
  monkeypatch.setattr(sweep_lib, "git_state", lambda path: ("c0ffee", []))
  monkeypatch.setattr(sweep_lib, "machine_description", lambda python: "test machine")
  args = ["--methods", "slam_ags", "--witness-rates", "0.1", "--seeds", "0,1",
          "--selection", str(tmp_path / "sel.json"),
          "--reuse-from", str(tmp_path / "selection.csv"), "--csv", str(tmp_path / "runs.csv"),
          "--workdir-root", str(tmp_path / "w")]
  assert sweep_lib.main(args) == 0
  assert runner.calls == [("slam_ags", 0.1, 1)]  # seed 0 came from the selection; seed 1 (other hash) ran
  rows = _rows(tmp_path)
  assert [(r["seed"], r["bag_f1"], r["val_bag_auc"]) for r in rows][0] == ("0", "0.77", "0.9") and len(rows) == 2
  assert sweep_lib.main(args) == 0 and len(_rows(tmp_path)) == 2 and len(runner.calls) == 1  # copied once
