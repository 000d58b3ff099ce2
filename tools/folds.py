r"""Cross-validation on the user's slides: every fold of ``bags.folds``, then a per-fold table and mean +- std.

  python launch/folds.py --config=configs/demo.py --workdir=workdirs/my_slides \
      --config.bags.source=slides --config.data.root=... --config.data.slides_csv=... \
      --config.data.negative_labels=normal [--config.<key>=<value> ...]

Fold i is one subprocess, ``python -m slamags_jax.main --config=<config>
--workdir=<workdir>/fold<i> --config.bags.fold=<i> <the --config.* flags>``, its output
appended to ``<workdir>/fold<i>/folds.log``. Resumable as the PBC-ERB sweep: a fold whose
``report/summary.json`` exists is done and skipped; a killed fold resumes from its
completed stages and pretraining checkpoint (main's own resumption) when the same command
is run again. Each fold pretrains on its own training slides only.

When every fold is done it writes ``<workdir>/oof.csv`` (every slide's out-of-fold class
probabilities), ``<workdir>/oof.json`` and, in ``folds.md``, the pooled out-of-fold
patient ROC-AUC with its 95 % interval (DeLong), balanced accuracy and Brier score
(``report/uncertainty.py``); and ``<workdir>/folds.csv`` (one row per fold: test
slides, accuracy, macro F1, macro ROC-AUC, ``bag_f1``/``bag_auc`` as the report defines
them, retrieval AP where cells are annotated, per-label AUC) and ``<workdir>/folds.md``
(the same table plus mean +- std over the folds, population std). Bad input of a fold
(exit status 2: the config, the CSVs, the folders) stops the runner with that fold's
``error:`` line and status 2; another failing fold is reported and the runner goes on,
exiting 1 at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from slamags_jax import app
from slamags_jax import config as config_lib
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

# (column, report/summary.json key)
METRICS = (("accuracy", "bag_accuracy"), ("macro_f1", "macro_f1"), ("macro_auc", "macro_auc"),
           ("bag_f1", "bag_f1"), ("bag_auc", "bag_auc"), ("retrieval_ap_mean", "retrieval_ap_mean"))


_fail = app.fail


def config_folds(config_path: str, overrides: Sequence[str]) -> int:
  """``bags.folds`` as the runs will see it (``config.load``: the file with the overrides, validated)."""
  pairs = [tuple(arg.removeprefix("--config.").split("=", 1)) for arg in overrides]
  try:
    return int(config_lib.load(config_path, [p for p in pairs if len(p) == 2]).bags.folds)
  except UserError as e:
    _fail(e)


def fold_command(python: str, config_path: str, workdir: str, fold: int, overrides: Sequence[str]) -> list[str]:
  return [python, "-m", "slamags_jax.main", f"--config={config_path}", f"--workdir={workdir}",
          f"--config.bags.fold={fold}", *overrides]


def _row(fold: int, summary: dict[str, Any]) -> dict[str, Any]:
  row = {"fold": fold, "test_slides": summary.get("n_test_bags")}
  for column, key in METRICS:
    row[column] = summary.get(key)
  per_class = summary.get("per_class") or {}
  for name in summary.get("labels") or sorted(per_class):
    row[f"auc_{name}"] = (per_class.get(name) or {}).get("auc")
  return row


def _num(x: Any) -> float:
  return float(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(float(x)) else float("nan")


def _cell(x: Any) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return ""
  return f"{x:.6g}" if isinstance(x, float) else str(x)


def tables(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
  """(folds.csv text, folds.md text) with mean +- std over the folds."""
  columns = list(rows[0].keys())
  for r in rows[1:]:
    columns += [c for c in r if c not in columns]
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for r in rows:
    w.writerow([_cell(r.get(c)) for c in columns])
  stats = {}
  for c in columns[2:]:
    vals = [v for v in (_num(r.get(c)) for r in rows) if math.isfinite(v)]
    stats[c] = (sum(vals) / len(vals), math.sqrt(sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / len(vals))) \
        if vals else None
  md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    md.append("| " + " | ".join(_cell(r.get(c)) if not isinstance(r.get(c), float) else f"{r[c]:.3f}"
                                  for c in columns) + " |")
  md.append("| mean ± std | " + str(sum(int(r.get("test_slides") or 0) for r in rows)) + " | " + " | ".join(
      f"{stats[c][0]:.3f} ± {stats[c][1]:.3f}" if stats[c] else "n/a" for c in columns[2:]) + " |")
  return buf.getvalue(), "\n".join(md) + "\n"


def pooled_oof(root: str, k: int) -> str:
  """Writes ``<root>/oof.csv`` and ``<root>/oof.json`` (pooled out-of-fold numbers); returns their Markdown."""
  from slamags_jax.report import uncertainty
  done = [(f, fileio.read_json(os.path.join(root, f"fold{f}", "report", "summary.json"))) for f in range(k)
          if os.path.exists(os.path.join(root, f"fold{f}", "report", "summary.json"))]
  pool = uncertainty.pooled_from_summaries(done)
  if pool is None:
    return ""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["slide_id", "fold", "label"] + [f"p_{n}" for n in pool["labels"]])
  for r in pool["rows"]:
    w.writerow([r["slide_id"], r["fold"], r["label"]] + [f"{float(p):.10g}" for p in r["probs"]])
  fileio.write_text(os.path.join(root, "oof.csv"), buf.getvalue())
  fileio.write_json(os.path.join(root, "oof.json"), {kk: v for kk, v in pool.items() if kk != "rows"})
  return uncertainty.pooled_markdown(pool) + "\n"


def run_folds(config_path: str, root: str, overrides: Sequence[str], python: str = sys.executable) -> int:
  """Runs the folds that are not done, then writes the tables; the exit status."""
  k = config_folds(config_path, overrides)
  if k < 2:
    _fail(f"bags.folds must be >= 2, got {k}")
  os.makedirs(root, exist_ok=True)
  failed = []
  for fold in range(k):
    workdir = os.path.join(root, f"fold{fold}")
    marker = os.path.join(workdir, "report", "summary.json")
    if os.path.exists(marker):
      print(f"fold {fold}/{k}: done, skipped", flush=True)
      continue
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    print(f"fold {fold}/{k}: running (log: {os.path.join(workdir, 'folds.log')})", flush=True)
    with open(os.path.join(workdir, "folds.log"), "a") as log:
      proc = subprocess.run(fold_command(python, config_path, workdir, fold, overrides),
                            stdout=log, stderr=subprocess.PIPE, text=True)
      log.write(proc.stderr)
    if proc.returncode == 2:
      lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
      sys.stderr.write((lines[-1] if lines else f"error: fold {fold} failed with status 2") + "\n")
      return 2
    if proc.returncode != 0:
      print(f"fold {fold}/{k}: FAILED (status {proc.returncode}); tail:\n" + "\n".join(proc.stderr.splitlines()[-10:]),
            flush=True)
      failed.append(fold)
      continue
    manifest = fileio.read_json(os.path.join(workdir, "bags", "manifest.json"))
    if manifest.get("source") != "slides" or str(manifest["settings"].get("split_from", "")).startswith("csv"):
      _fail("the folds need bags.source=slides and a slides CSV without a split column "
            "(with a split column every fold would be the same split)")
    print(f"fold {fold}/{k}: done in {time.time() - t0:.0f} s", flush=True)
  rows = []
  for fold in range(k):
    marker = os.path.join(root, f"fold{fold}", "report", "summary.json")
    if os.path.exists(marker):
      rows.append(_row(fold, fileio.read_json(marker)))
  if rows:
    csv_text, md = tables(rows)
    fileio.write_text(os.path.join(root, "folds.csv"), csv_text)
    pool = pooled_oof(root, k)  # every patient scored once: the pooled AUC with its 95 % interval
    fileio.write_text(os.path.join(root, "folds.md"), f"# {len(rows)} of {k} folds\n\n" + pool + "## Per fold\n\n" + md)
    print(md, flush=True)
  if failed:
    print(f"{len(failed)} fold(s) failed: {', '.join(map(str, failed))}; run the same command again to retry",
          flush=True)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="config file, e.g. configs/demo.py")
  parser.add_argument("--workdir", required=True, help="folder of the folds (fold<i>/ each, folds.csv, folds.md)")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    _fail(f"unexpected arguments: {' '.join(bad)} (only --config.<key>=<value> flags pass to the runs)")
  if any(a.startswith("--config.bags.fold=") for a in rest):
    _fail("--config.bags.fold is set by the runner (it runs every fold)")
  if not os.path.isfile(args.config):
    _fail(f"config file {args.config!r} not found")
  return run_folds(os.path.abspath(args.config), os.path.abspath(args.workdir), rest)


if __name__ == "__main__":
  sys.exit(main())
