r"""The collapse study of issue 15: which factor stops SLAM-AGS's head collapse on PBC-ERB.

  python launch/collapse_study.py run [--only FACTOR,...] [--seeds 0,1,2]   # resumable
  python launch/collapse_study.py collect    # workdirs -> results/collapse/study.csv
  python launch/collapse_study.py results    # study.csv -> table + plot in results/collapse/

One factor at a time against the authors' setting (``configs/pbc_erb.py`` with
``pretrain.method=slam_ags``), at witness rates 1 % and 10 %, judged on the *validation*
bags only (MIL validation ROC-AUC, and retrieval on the positive validation bags); the
test bags are not read here. Each factor is one `launch/pbc_erb_sweep.py` invocation
(committed code only, resumable, one row per run in ``results/collapse/runs.csv``, the
full settings in ``results/collapse/settings/<hash>.json``) into
``workdirs/collapse/<factor>/``. ``collect`` reads each run's ``pretrain/summary.json``,
``pretrain/metrics.jsonl`` and ``report/summary.json`` into ``study.csv`` (committed, so
``results`` needs no workdir).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from typing import Sequence

import numpy as np

from slamags_jax import app
from tools import REPO

OUT = os.path.join(REPO, "results", "collapse")
RUNS_CSV = os.path.join(OUT, "runs.csv")
STUDY_CSV = os.path.join(OUT, "study.csv")
ROOT = os.path.join(REPO, "workdirs", "collapse")
WITNESS_RATES = (0.01, 0.1)

# name -> (method, --set overrides, what it changes). "authors" is the reference point.
FACTORS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "authors": ("slam_ags", (), "the authors' setting (configs/pbc_erb.py, slam_ags)"),
    "sim_t1": ("slam_ags", ("pretrain.similarity_temperature=1.0",),
               "similarity loss at temperature 1.0 (its pull 14x weaker; NT-Xent keeps 0.07)"),
    "sim_t0.3": ("slam_ags", ("pretrain.similarity_temperature=0.3",),
                 "similarity loss at temperature 0.3 (pull 4.3x weaker)"),
    "warmup_lr1e-3": ("slam_ags", ("pretrain.warmup_epochs=1", "pretrain.lr=0.001"),
                      "the authors' lr 1e-3 with their warm-up share scaled to 4 epochs (1 epoch)"),
    "heads_all": ("slam_ags", ("model.task_heads=per_task",),
                  "one projection head per task; surgery over all parameters"),
    "heads_shared": ("slam_ags", ("model.task_heads=per_task", "pretrain.surgery_scope=shared"),
                     "one projection head per task; surgery over the encoder only (LibMTL)"),
    "balance": ("slam_ags", ("pretrain.balance_task_norms=True",),
                "task-gradient norms equalised (to their mean) before the surgery"),
    "pooled": ("slam_ags", ("model.embedding=pooled",), "MIL reads the pooled encoder features"),
    "abmil": ("slam_ags", ("mil.model=abmil",), "gated-attention ABMIL instead of PAMIL"),
    "bags200": ("slam_ags", ("bags.n_train=200",), "200 training bags instead of 60"),
    "sim_t1_sum": ("weaksupcon", ("pretrain.similarity_temperature=1.0",),
                   "sim_t1 with the plain sum (weaksupcon)"),
    "sim_t1_pcgrad": ("pcgrad", ("pretrain.similarity_temperature=1.0",), "sim_t1 with PCGrad"),
    "heads_all_sum": ("weaksupcon", ("model.task_heads=per_task",), "heads_all with the plain sum"),
    "heads_all_pcgrad": ("pcgrad", ("model.task_heads=per_task",), "heads_all with PCGrad"),
    "simclr": ("simclr", (), "single-task SimCLR on all patches (for scale)"),
}

COLUMNS = ("factor", "method", "witness_rate", "seed", "ntxent_final", "ntxent_last_epoch", "ntxent_chance",
           "ntxent_over_chance", "similarity_final", "head_effective_rank", "pooled_effective_rank",
           "collapsed", "conflict_fraction", "mean_task_cosine", "grad_norm_ntxent", "grad_norm_similarity",
           "val_bag_auc", "val_recall_at_k_mean", "val_retrieval_ap_mean", "val_random_recall_at_k",
           "pretrain_wall_s", "commit", "settings_hash", "workdir")


def run(factors: Sequence[str], seeds: str, witness_rates: str) -> int:
  status = 0
  for name in factors:
    method, sets, _ = FACTORS[name]
    cmd = [sys.executable, "-m", "tools.pbc_erb.sweep", "--methods", method,
           "--witness-rates", witness_rates, "--seeds", seeds, "--csv", RUNS_CSV,
           "--workdir-root", os.path.join(ROOT, name)]
    for s in sets:
      cmd += ["--set", s]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    status = max(status, subprocess.call(cmd, cwd=REPO))
  return status


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _mean_of(records: list[dict], key: str) -> float | None:
  """Mean of ``key`` over the records that have it (None when none has)."""
  vals = [float(m[key]) for m in records if key in m]
  return float(np.mean(vals)) if vals else None


def _factor_of(workdir: str) -> str | None:
  rel = os.path.relpath(workdir, ROOT).split(os.sep)
  return rel[0] if rel and rel[0] in FACTORS else None


def collect() -> int:
  rows = []
  with open(RUNS_CSV) as f:
    runs = list(csv.DictReader(f))
  for r in runs:
    wd = r["workdir"] if os.path.isabs(r["workdir"]) else os.path.join(REPO, r["workdir"])
    factor = _factor_of(wd)
    if factor is None or r.get("dirty") == "1":
      continue
    pre = _read_json(os.path.join(wd, "pretrain", "summary.json"))
    rep = _read_json(os.path.join(wd, "report", "summary.json"))
    steps = [m for m in _jsonl(os.path.join(wd, "pretrain", "metrics.jsonl"))
             if m.get("kind") == "step" and not m.get("skipped")]
    last = steps[-1] if steps else {}
    col = pre.get("collapse") or {}
    rows.append({
        "factor": factor, "method": r["method"], "witness_rate": r["witness_rate"], "seed": r["seed"],
        "ntxent_final": last.get("loss/ntxent", last.get("loss/ntxent_all")),
        "ntxent_last_epoch": col.get("ntxent_last_epoch"),
        "ntxent_chance": col.get("ntxent_chance"), "ntxent_over_chance": col.get("ntxent_over_chance"),
        "similarity_final": last.get("loss/similarity"),
        "head_effective_rank": pre.get("final_head_effective_rank"),
        "pooled_effective_rank": pre.get("final_pooled_effective_rank"), "collapsed": pre.get("collapsed"),
        "conflict_fraction": pre.get("conflict_fraction"), "mean_task_cosine": pre.get("mean_task_cosine"),
        "grad_norm_ntxent": _mean_of(steps, "grad_norm/ntxent") or _mean_of(steps, "grad_norm/ntxent_all"),
        "grad_norm_similarity": _mean_of(steps, "grad_norm/similarity"),
        "val_bag_auc": rep.get("val_bag_auc"), "val_recall_at_k_mean": rep.get("val_recall_at_k_mean"),
        "val_retrieval_ap_mean": rep.get("val_retrieval_ap_mean"),
        "val_random_recall_at_k": min(int(rep["topk_k"]), 200) / 200.0,
        "pretrain_wall_s": pre.get("wall_s"), "commit": r["commit"], "settings_hash": r["settings_hash"],
        "workdir": os.path.relpath(wd, REPO)})
  order = list(FACTORS)
  rows.sort(key=lambda x: (order.index(x["factor"]), float(x["witness_rate"]), int(x["seed"])))
  os.makedirs(OUT, exist_ok=True)
  tmp = STUDY_CSV + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
      w.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
  os.replace(tmp, STUDY_CSV)
  print(f"{STUDY_CSV}: {len(rows)} runs")
  return 0


def _num(x: str) -> float:
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def _ms(vals: list[float], digits: int = 2) -> str:
  v = [x for x in vals if not math.isnan(x)]
  if not v:
    return "n/a"
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def results() -> int:
  with open(STUDY_CSV) as f:
    rows = list(csv.DictReader(f))
  lines = ["| factor | what changes | WR | seeds | NT-Xent final / chance | head rank | pooled rank | "
           "collapsed | conflict frac. | val AUC | val recall@20 | val AP |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name in FACTORS:
    for wr in WITNESS_RATES:
      sel = [r for r in rows if r["factor"] == name and abs(float(r["witness_rate"]) - wr) < 1e-9]
      if not sel:
        continue
      g = lambda k: [_num(r[k]) for r in sel]  # noqa: E731
      coll = sum(r["collapsed"] == "True" for r in sel)
      lines.append(
          f"| `{name}` | {FACTORS[name][2]} | {100 * wr:g} % | {len(sel)} | {_ms(g('ntxent_over_chance'))} | "
          f"{_ms(g('head_effective_rank'), 1)} | {_ms(g('pooled_effective_rank'), 1)} | {coll}/{len(sel)} | "
          f"{_ms(g('conflict_fraction'))} | {_ms(g('val_bag_auc'))} | {_ms(g('val_recall_at_k_mean'))} | "
          f"{_ms(g('val_retrieval_ap_mean'))} |")
  table = "\n".join(lines) + "\n"
  commits = sorted({r["commit"][:7] for r in rows})
  gen = (f"_Generated by `python launch/collapse_study.py results` from `study.csv` ({len(rows)} runs, "
         f"commits {', '.join(commits)}); do not edit by hand._\n\n" + table)
  readme = os.path.join(OUT, "README.md")
  text = open(readme).read() if os.path.exists(readme) else "<!-- BEGIN GENERATED -->\n<!-- END GENERATED -->\n"
  a, b = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
  head, rest = text.split(a, 1)
  _, tail = rest.split(b, 1)
  with open(readme + ".tmp", "w") as f:
    f.write(head + a + "\n" + gen + b + tail)
  os.replace(readme + ".tmp", readme)
  _plot(rows)
  print(table)
  return 0


def _plot(rows: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  markers = {0.01: "o", 0.1: "s"}
  names = [n for n in FACTORS if any(r["factor"] == n for r in rows)]
  for i, name in enumerate(names):
    for wr in WITNESS_RATES:
      sel = [r for r in rows if r["factor"] == name and abs(float(r["witness_rate"]) - wr) < 1e-9]
      if not sel:
        continue
      x = [_num(r["ntxent_over_chance"]) for r in sel]
      y = [_num(r["head_effective_rank"]) for r in sel]
      v = [_num(r["val_bag_auc"]) for r in sel]
      axes[0].scatter(x, y, marker=markers[wr], color=f"C{i % 10}", label=name if wr == 0.01 else None)
      axes[1].scatter(y, v, marker=markers[wr], color=f"C{i % 10}")
  axes[0].axvline(0.85, color="grey", ls=":", lw=1)
  axes[0].axhline(15, color="grey", ls=":", lw=1)
  axes[0].set_xlabel("NT-Xent at the end / chance level ln(2B-1)")
  axes[0].set_ylabel("head effective rank (probe cells)")
  axes[0].set_yscale("log")
  axes[1].set_xlabel("head effective rank")
  axes[1].set_xscale("log")
  axes[1].set_ylabel("MIL validation ROC-AUC")
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle("PBC-ERB, collapse study (o: WR 1 %, s: WR 10 %); validation bags only")
  fig.tight_layout()
  fig.savefig(os.path.join(OUT, "collapse.png"), dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("command", choices=("run", "collect", "results"))
  p.add_argument("--only", default=",".join(FACTORS), help="comma list of factors (default: all)")
  p.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
  p.add_argument("--witness-rates", default=",".join(map(str, WITNESS_RATES)))
  a = p.parse_args(argv)
  if a.command == "run":
    names = [n for n in a.only.split(",") if n]
    bad = [n for n in names if n not in FACTORS]
    if bad:
      sys.stderr.write(app.error_line(f"unknown factor {bad[0]}; factors are {','.join(FACTORS)}"))
      return 2
    return run(names, a.seeds, a.witness_rates)
  return collect() if a.command == "collect" else results()


if __name__ == "__main__":
  sys.exit(main())
