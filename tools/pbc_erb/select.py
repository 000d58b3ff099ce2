r"""Selection for the PBC-ERB benchmark (benchmark.md, "Selection"): one grid, every method.

  python launch/pbc_erb_select.py run       # the candidate runs -> results/pbc_erb/selection.csv
  python launch/pbc_erb_select.py choose    # -> results/pbc_erb/selection.json and selection.md

``run`` calls ``tools.pbc_erb.sweep`` once per grid point, for every method, at WR 1 %
and 10 %, seed 0, into ``selection.csv`` (workdirs under ``workdirs/pbc_erb_select``); it
is resumable as the sweep is. The grid (``GRID``) is shared by all methods: the same
candidates, the same number of runs and the same budget per run for each. None of the
methods added in issue #15 (``*_heads``) has an option of its own beyond what its name fixes,
so the grid is the learning rate alone: the tuned value of configs/pbc_erb.py and the
next half-decade up. Two points because one candidate costs 18 whole runs (about an hour
on 2 cores); 0.001 (the authors' value) was left out: with its warm-up it did not stop the
collapse (results/collapse, factor ``warmup_lr1e-3``) and 4 epochs at a third of the
rate under-train the single-task methods further. Adding a value here and re-running
``run`` then ``choose`` extends the selection for every method alike.

``choose`` picks one candidate per method from the rows of ``selection.csv`` (clean rows
only, the latest per cell): the best mean **validation** bag ROC-AUC of the MIL model over
WR 1 % and 10 %, ties broken by the mean validation retrieval AP, then by the grid's order.
A candidate counts only with both witness rates recorded. Test-bag columns are never read.
It writes every candidate's numbers and the choice to ``selection.json`` (which
``pbc_erb_sweep.py --selection`` and ``pbc_erb_results.py`` read) and a Markdown table to
``selection.md``. The chosen candidate's settings hash is recorded: the sweep refuses a
selection whose hash no longer matches the config (the settings changed since).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from typing import Any, Sequence

from slamags_jax import app
from slamags_jax import config as config_lib
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError
from tools import REPO
from tools.pbc_erb import common
from tools.pbc_erb.common import chosen_overrides, load_selection  # noqa: F401  (as before the split: select.load)

load = load_selection

RESULTS = os.path.join(REPO, "results", "pbc_erb")
DEFAULT_CSV = os.path.join(RESULTS, "selection.csv")
DEFAULT_JSON = os.path.join(RESULTS, "selection.json")
DEFAULT_ROOT = os.path.join(REPO, "workdirs", "pbc_erb_select")
# The shared grid: config key -> candidate values (as --config flags spell them), in order.
GRID: dict[str, tuple[str, ...]] = {"pretrain.lr": ("0.003", "0.01")}
WITNESS_RATES = (0.01, 0.1)
SEED = 0
RULE = ("best mean validation bag ROC-AUC over WR 1 % and 10 % (seed 0); ties: mean validation retrieval AP, "
        "then the grid's order")


def candidates() -> list[list[tuple[str, str]]]:
  """Every grid point as a list of (key, value) overrides, in the grid's order."""
  points: list[list[tuple[str, str]]] = [[]]
  for key, values in GRID.items():
    points = [p + [(key, v)] for p in points for v in values]
  return points


def run(args: argparse.Namespace) -> int:
  """One sweep per grid point (all methods, WR 1 % and 10 %, seed 0); resumable."""
  status = 0
  for point in candidates():
    cmd = [args.python, "-m", "tools.pbc_erb.sweep",  # from the repo root: `tools` without an install
           "--methods", args.methods, "--witness-rates", ",".join(map(str, WITNESS_RATES)), "--seeds", str(SEED),
           "--csv", os.path.abspath(args.csv), "--workdir-root", os.path.abspath(args.workdir_root),
           "--config", os.path.abspath(args.config)]
    cmd += [a for k, v in point for a in ("--set", f"{k}={v}")]
    if args.dry_run:
      cmd.append("--dry-run")
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc == 2:
      return 2
    status = status or rc
  return status


def _mean(values: Sequence[float]) -> float:
  v = [x for x in values if math.isfinite(x)]
  return sum(v) / len(v) if len(v) == len(values) and v else math.nan


def _f(text: Any) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return math.nan


def choose(rows: Sequence[dict[str, str]], settings_of_hash: dict[str, dict[str, Any] | None],
           methods: Sequence[str]) -> dict[str, Any]:
  """The selection record: every candidate of every method, and the chosen one (see the module doc)."""
  points = candidates()
  # The grid point of each settings hash, read from settings/<hash>.json (its overrides).
  point_of: dict[str, int] = {}
  for digest, saved in settings_of_hash.items():
    if not saved:
      continue
    over = dict(o.partition("=")[::2] for o in saved.get("overrides", []))
    for i, p in enumerate(points):
      if all(over.get(k) == v for k, v in p) and set(over) <= {k for k, _ in p}:
        point_of[digest] = i
  latest: dict[tuple[str, str, str], dict[str, str]] = {}
  for r in rows:
    if r.get("dirty", "0") not in ("", "0") or r.get("seed") != str(SEED):
      continue
    latest[(r["method"], r.get("settings_hash", ""), common.wr_key(r["witness_rate"]))] = r
  wrs = [common.wr_key(w) for w in WITNESS_RATES]
  out: dict[str, Any] = {"rule": RULE, "grid": {k: list(v) for k, v in GRID.items()},
                         "witness_rates": list(WITNESS_RATES), "seed": SEED, "methods": {}}
  for m in methods:
    cands = []
    for digest, i in sorted(point_of.items(), key=lambda kv: kv[1]):
      cells = [latest.get((m, digest, w)) for w in wrs]
      if any(c is None for c in cells):
        continue
      auc = [_f(c["val_bag_auc"]) for c in cells]
      ap = [_f(c["val_retrieval_ap_mean"]) for c in cells]
      cands.append({
          "overrides": [f"{k}={v}" for k, v in points[i]], "settings_hash": digest, "grid_index": i,
          "val_bag_auc": dict(zip(wrs, auc)), "val_retrieval_ap_mean": dict(zip(wrs, ap)),
          "val_recall_at_k_mean": {w: _f(c.get("val_recall_at_k_mean")) for w, c in zip(wrs, cells)},
          "mean_val_bag_auc": _mean(auc), "mean_val_retrieval_ap": _mean(ap),
          "collapsed": {w: c.get("collapsed", "") for w, c in zip(wrs, cells)},
          "ntxent_over_chance": {w: _f(c.get("ntxent_over_chance")) for w, c in zip(wrs, cells)},
          "pretrain_wall_s": {w: _f(c.get("pretrain_wall_s")) for w, c in zip(wrs, cells)},
          "commit": sorted({c["commit"] for c in cells})})
    if not cands:
      out["methods"][m] = {"chosen": None, "candidates": []}
      continue
    key = lambda c: (-_nan_low(c["mean_val_bag_auc"]), -_nan_low(c["mean_val_retrieval_ap"]), c["grid_index"])  # noqa: E731
    best = min(cands, key=key)
    out["methods"][m] = {"chosen": best["overrides"], "settings_hash": best["settings_hash"],
                         "complete": len(cands) == len(points), "candidates": cands}
  return out


def _nan_low(x: float) -> float:
  return x if math.isfinite(x) else -math.inf


def markdown(sel: dict[str, Any]) -> str:
  """The selection as a Markdown table: one line per (method, candidate), the chosen in bold."""
  wrs = [common.wr_key(w) for w in sel["witness_rates"]]
  lines = [f"Rule: {sel['rule']}. Grid: " + "; ".join(f"`{k}` in {', '.join(v)}" for k, v in sel["grid"].items())
           + ". Validation bags only; the test bags were not read.\n\n",
           "| method | candidate | val AUC WR 1 % | val AUC WR 10 % | mean val AUC | mean val AP | NT-Xent / chance "
           "(1 %, 10 %) | chosen |\n", "|---|---|---|---|---|---|---|---|\n"]
  fmt = lambda x: f"{x:.3f}" if math.isfinite(x) else "n/a"  # noqa: E731
  for m, rec in sel["methods"].items():
    if not rec["candidates"]:
      lines.append(f"| `{m}` | (no complete candidate) | | | | | | |\n")
    for c in rec["candidates"]:
      chosen = c["overrides"] == rec["chosen"]
      ratio = ", ".join(fmt(c["ntxent_over_chance"][w]) for w in wrs)
      lines.append(f"| `{m}` | `{' '.join(c['overrides'])}` | {fmt(c['val_bag_auc'][wrs[0]])} | "
                   f"{fmt(c['val_bag_auc'][wrs[1]])} | {fmt(c['mean_val_bag_auc'])} | "
                   f"{fmt(c['mean_val_retrieval_ap'])} | {ratio if 'nan' not in ratio else 'n/a'} | "
                   f"{'**chosen**' if chosen else ''} |\n")
  return "".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("command", choices=("run", "choose"))
  p.add_argument("--methods", default=",".join(common.METHODS), help="comma list (default: every method)")
  p.add_argument("--config", default=common.DEFAULT_CONFIG)
  p.add_argument("--csv", default=DEFAULT_CSV, help="candidate rows (default: results/pbc_erb/selection.csv)")
  p.add_argument("--json", default=DEFAULT_JSON, help="choice record (default: results/pbc_erb/selection.json)")
  p.add_argument("--workdir-root", default=DEFAULT_ROOT)
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--dry-run", action="store_true", help="run: print what would run")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "run":
    return run(args)
  try:
    rows = common.read_rows(args.csv, lambda m: sys.stderr.write(f"warning: {m}\n"))
    hashes = {r.get("settings_hash", "") for r in rows}
    sel = choose(rows, {h: common.read_settings(args.csv, h) for h in hashes},
                 config_lib.split_csv(args.methods))
  except UserError as e:
    sys.stderr.write(app.error_line(e))
    return 2
  fileio.write_json(args.json, sel)
  fileio.write_text(os.path.splitext(args.json)[0] + ".md", markdown(sel))
  for m, rec in sel["methods"].items():
    print(f"{m}: {' '.join(rec['chosen']) if rec['chosen'] else 'no complete candidate'}"
          + ("" if rec.get("complete", True) else " (not every candidate recorded)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
