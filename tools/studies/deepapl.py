r"""The DeepAPL study table and plot (results/deepapl/README.md) from cross-validation roots.

  python -m tools.studies.deepapl --runs=workdirs/deepapl --out=results/deepapl

Each sub-folder of ``--runs`` that holds ``fold<i>/report/summary.json`` is one setting
(a ``launch/folds.py`` root; name: ``<setting>`` or ``<setting>_s<seed>``). Per setting,
over every fold done: the pooled out-of-fold patient ROC-AUC with its 95 % interval
(DeLong, ``report/uncertainty.py``), balanced accuracy, Brier score and ECE of the
out-of-fold probabilities, the same after temperature scaling (T fitted per fold on that
fold's validation slides only, applied to its test slides; pooled AUC too, since a
per-fold temperature changes the ranking across folds), promyelocyte retrieval in
APL test patients (AP and recall@K over annotated slides), the per-fold AUC mean +- std
and the CPU seconds of the folds (``pretrain``/``mil`` wall from their summaries).

Also a plain mean-pooling baseline on the same embeddings (``--mean_pool``): each slide
is the mean of its cells' standardised embeddings; an L2 logistic regression (C chosen
on the fold's validation slides from 0.01, 0.1, 1) is trained on the fold's training
slides and scores its test slides.

Writes ``<out>/study.csv``, ``<out>/study.md``, ``<out>/study_factors.md`` (the
one-factor-at-a-time tables of ``FACTORS``), ``<out>/study_seeds.md`` (each setting
over its seeds: a ``_s<k>`` in a name is seed k, none is seed 0) and ``<out>/study.png``
(pooled AUC with interval per setting). Never reads a test slide to choose anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np

from slamags_jax.report import uncertainty
from tools import REPO


def _folds(root: str) -> list[tuple[int, str]]:
  out = []
  for name in os.listdir(root):
    m = re.match(r"^fold(\d+)$", name)
    if m and os.path.exists(os.path.join(root, name, "report", "summary.json")):
      out.append((int(m.group(1)), os.path.join(root, name)))
  return sorted(out)


def _read(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def temperature_scaled(folds: list[tuple[int, str]], labels: list[str]) -> dict[str, Any] | None:
  """Pooled OOF after per-fold temperature scaling fitted on the fold's validation slides."""
  rows, temps = [], []
  for fold, wd in folds:
    with np.load(os.path.join(wd, "mil", "predictions.npz")) as z:
      split, logits, y, ids = z["split"], z["logits"].astype(np.float64), z["label"], z["bag_ids"]
    val = split == "val"
    if not val.any():
      return None
    t = uncertainty.fit_temperature(logits[val], y[val])
    temps.append(t)
    p = uncertainty.apply_temperature(logits[split == "test"], t)
    for sid, yy, pp in zip(ids[split == "test"], y[split == "test"], p):
      rows.append({"slide_id": str(sid), "fold": fold, "label": labels[int(yy)], "probs": pp.tolist()})
  pool = uncertainty.pooled(rows, labels)
  pool["temperatures"] = temps
  return pool


def mean_pool_baseline(folds: list[tuple[int, str]], labels: list[str]) -> dict[str, Any]:
  from sklearn.linear_model import LogisticRegression
  rows = []
  for fold, wd in folds:
    index = _read(os.path.join(wd, "embeddings", "index.json"))
    x, y, split, ids = [], [], [], []
    for b in index["bags"]:
      with np.load(os.path.join(wd, "embeddings", b["file"])) as z:
        e = z["embeddings"].astype(np.float64)
      x.append(e)
      y.append(int(b["label"]))
      split.append(b["split"])
      ids.append(b["id"])
    split_a = np.asarray(split)
    train_cells = np.concatenate([e for e, s in zip(x, split) if s == "train"])
    mu, sd = train_cells.mean(0), train_cells.std(0) + 1e-6
    feats = np.stack([((e - mu) / sd).mean(0) for e in x])
    y_a = np.asarray(y)
    tr, va, te = split_a == "train", split_a == "val", split_a == "test"
    best = None
    for c in (0.01, 0.1, 1.0):
      clf = LogisticRegression(C=c, max_iter=2000).fit(feats[tr], y_a[tr])
      a = uncertainty.auc(y_a[va] == 1, clf.predict_proba(feats[va])[:, 1]) if va.any() else 0.0
      if best is None or (a if math.isfinite(a) else -1) > best[0]:
        best = (a if math.isfinite(a) else -1, c)
    clf = LogisticRegression(C=best[1], max_iter=2000).fit(feats[tr], y_a[tr])
    p = clf.predict_proba(feats[te])
    for sid, yy, pp in zip(np.asarray(ids)[te], y_a[te], p):
      rows.append({"slide_id": str(sid), "fold": fold, "label": labels[int(yy)], "probs": pp.tolist()})
  return uncertainty.pooled(rows, labels)


def setting_row(name: str, root: str, mean_pool: bool) -> list[dict[str, Any]]:
  folds = _folds(root)
  if not folds:
    return []
  summaries = [(f, _read(os.path.join(wd, "report", "summary.json"))) for f, wd in folds]
  pool = uncertainty.pooled_from_summaries(summaries)
  labels = pool["labels"]
  aucs = [s["bag_auc"] for _, s in summaries if s.get("bag_auc") is not None]
  secs = []
  for _, wd in folds:
    t = 0.0
    for stage in ("pretrain", "mil"):
      p = os.path.join(wd, stage, "summary.json")
      if os.path.exists(p):
        t += float(_read(p).get("wall_s") or 0.0)
    secs.append(t)
  temp = temperature_scaled(folds, labels)
  base = {"setting": name, "folds": len(folds), "slides": pool["n_slides"],
          "fold_auc_mean": float(np.mean(aucs)), "fold_auc_std": float(np.std(aucs)),
          "pretrain_plus_mil_wall_s_per_fold": float(np.mean(secs)),
          "promyelocyte_ap": pool.get("retrieval_ap_mean"), "promyelocyte_recall_at_k": pool.get("recall_at_k_mean"),
          "retrieval_slides": pool.get("retrieval_slides")}
  out = [{**base, "aggregator": summaries[0][1].get("mil_model"), **_metrics(pool),
          **({"brier_temp": temp["brier"], "ece_temp": temp["ece"], "pooled_auc_temp": temp["bag_auc"],
              "temperature_median": float(np.median(temp["temperatures"]))} if temp else {})}]
  if mean_pool:
    mp = mean_pool_baseline(folds, labels)
    out.append({**base, "setting": name + "+meanpool", "aggregator": "mean-pool logreg", **_metrics(mp),
                "promyelocyte_ap": None, "promyelocyte_recall_at_k": None})
  return out


def _metrics(pool: dict[str, Any]) -> dict[str, Any]:
  ci = pool.get("bag_auc_ci95") or [float("nan"), float("nan")]
  return {"pooled_auc": pool["bag_auc"], "ci_lo": ci[0], "ci_hi": ci[1], "balanced_accuracy": pool["balanced_accuracy"],
          "accuracy": pool["accuracy"], "brier": pool["brier"], "ece": pool.get("ece")}


def seed_key(setting: str) -> tuple[str, int]:
  """``("r72_random_mean", 1)`` from ``r72_random_s1_mean``: the setting without its ``_s<k>`` and k (0 if none)."""
  m = re.search(r"_s(\d+)(?=_|$|\+)", setting)
  if not m:
    return setting, 0
  return setting[:m.start()] + setting[m.end():], int(m.group(1))


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting over its seeds: pooled AUC per seed, mean, min, max; mean balanced accuracy."""
  groups: dict[str, dict[int, dict[str, Any]]] = {}
  for r in rows:
    base, seed = seed_key(r["setting"])
    groups.setdefault(base, {})[seed] = r
  out = []
  for base, by_seed in groups.items():
    seeds = sorted(by_seed)
    aucs = [by_seed[k]["pooled_auc"] for k in seeds]
    out.append({"setting": base, "aggregator": by_seed[seeds[0]]["aggregator"], "seeds": seeds, "aucs": aucs,
                "auc_mean": float(np.mean(aucs)), "auc_min": float(min(aucs)), "auc_max": float(max(aucs)),
                "bal_acc_mean": float(np.mean([by_seed[k]["balanced_accuracy"] for k in seeds]))})
  return out


def seed_table(summary: list[dict[str, Any]]) -> str:
  md = ["| setting | MIL | seeds | pooled OOF AUC per seed | mean | min - max | bal. acc. (mean) |",
        "|---|---|---|---|---|---|---|"]
  for r in summary:
    md.append(f"| {r['setting']} | {r['aggregator']} | {','.join(map(str, r['seeds']))} | "
              f"{' / '.join(_f(a) for a in r['aucs'])} | {_f(r['auc_mean'])} | {_f(r['auc_min'])} - "
              f"{_f(r['auc_max'])} | {_f(r['bal_acc_mean'])} |")
  return "\n".join(md) + "\n"


# results/deepapl/README.md's one-factor-at-a-time tables: (title, [(label, setting)]).
FACTORS = [
    ("Input resolution (untrained encoder, width 16, mean pooling, `val_loss`)", [
        ("48 px (54 px cells)", "r48_random_mean_valloss"),
        ("72 px (81 px cells; the recipe until 96 px won)", "r72_random_mean_valloss"),
        ("96 px (108 px cells; the recipe)", "r96_random_mean_valloss")]),
    ("Encoder width (untrained, 72 px)", [
        ("16 (as the recipe)", "r72_random_mean_valloss"),
        ("32", "r72_random_w32_mean_valloss")]),
    ("Embedding (untrained, 72 px)", [
        ("head: the projection head's 512-d output (as the recipe)", "r72_random_mean_valloss"),
        ("pooled: the encoder's pooled features", "r72_random_pooled_mean_valloss")]),
    ("Pretraining method (1 epoch, 72 px, width 16, lr 0.003, batch 64; mean pooling, `val_loss`)", [
        ("`random` (no pretraining)", "r72_random_mean_valloss"),
        ("`weakly` (cells inherit the patient's label)", "r72_weakly_e1_mean_valloss"),
        ("`simclr`", "r72_simclr_e1_mean_valloss"),
        ("`slam_ags` (shared head, as the authors)", "r72_slam_ags_e1_mean_valloss"),
        ("`slam_ags_heads` (per-task heads, AGS)", "r72_slam_ags_heads_e1_mean_valloss"),
        ("`weaksupcon_heads` (control: plain sum)", "r72_weaksupcon_heads_e1_mean_valloss"),
        ("`pcgrad_heads` (control: PCGrad)", "r72_pcgrad_heads_e1_mean_valloss")]),
    ("Pretraining epochs (`weakly`, 72 px, seed 0)", [
        ("0 (untrained)", "r72_random_mean_valloss"),
        ("1 epoch (175-207 steps per fold)", "r72_weakly_e1_mean_valloss"),
        ("2 epochs", "r72_weakly_e2_mean_valloss")]),
    ("MIL aggregator (untrained encoder, 72 px, `val_auc` selection)", [
        ("mean pooling", "r72_random_mean"),
        ("ABMIL", "r72_random"),
        ("PAMIL", "r72_random_pamil"),
        ("mean-pooling logistic regression (baseline outside the pipeline)", "r72_random+meanpool")]),
    ("MIL selection (untrained encoder, 72 px)", [
        ("mean pooling, `val_loss` (as the recipe)", "r72_random_mean_valloss"),
        ("mean pooling, `val_auc`", "r72_random_mean"),
        ("ABMIL, `val_auc`", "r72_random"),
        ("ABMIL, `val_loss`", "r72_random_valloss"),
        ("ABMIL, `last_epoch`", "r72_random_lastepoch")]),
]


def factor_tables(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
  """``FACTORS`` as markdown tables: seed 0's pooled AUC with interval, and the seeds' AUCs where there are several."""
  by = {r["setting"]: r for r in rows}
  over = {r["setting"]: r for r in summary}
  out = []
  for title, items in FACTORS:
    out += [f"**{title}**", "", "| setting | row | pooled OOF AUC [95 % CI], seed 0 | bal. acc. | Brier | "
            "promyelocyte AP / recall@20 | seeds: pooled AUC (mean) |", "|---|---|---|---|---|---|---|"]
    for label, key in items:
      r = by.get(key)
      if r is None:
        out.append(f"| {label} | `{key}` | not run | | | | |")
        continue
      s = over.get(key)
      seeds = (f"{' / '.join(_f(a) for a in s['aucs'])} ({_f(s['auc_mean'])})" if s and len(s["seeds"]) > 1
               else "seed 0 only")
      ap = (f"{_f(r.get('promyelocyte_ap'))} / {_f(r.get('promyelocyte_recall_at_k'))}"
            if r.get("promyelocyte_ap") is not None else "")
      out.append(f"| {label} | `{key}` | {_f(r['pooled_auc'])} [{_f(r['ci_lo'])}, {_f(r['ci_hi'])}] | "
                 f"{_f(r['balanced_accuracy'])} | {_f(r['brier'])} | {ap} | {seeds} |")
    out.append("")
  return "\n".join(out)


def _f(x: Any, d: int = 3) -> str:
  return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else (f"{x:.{d}f}" if isinstance(
      x, float) else str(x))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", required=True)
  ap.add_argument("--out", default=os.path.join(REPO, "results", "deepapl"))
  ap.add_argument("--mean_pool", default="", help="comma list of settings to add the mean-pooling baseline to")
  ap.add_argument("--only", default="", help="comma list of settings (default: every root under --runs)")
  args = ap.parse_args(argv)
  names = [n for n in sorted(os.listdir(args.runs)) if os.path.isdir(os.path.join(args.runs, n))]
  if args.only:
    names = [n for n in args.only.split(",") if n in names]
  mp = set(filter(None, args.mean_pool.split(",")))
  rows = []
  for n in names:
    rows += setting_row(n, os.path.join(args.runs, n), n in mp)
  os.makedirs(args.out, exist_ok=True)
  cols = ["setting", "aggregator", "folds", "slides", "pooled_auc", "ci_lo", "ci_hi", "balanced_accuracy", "accuracy",
          "brier", "ece", "pooled_auc_temp", "brier_temp", "ece_temp", "temperature_median", "fold_auc_mean",
          "fold_auc_std", "promyelocyte_ap", "promyelocyte_recall_at_k", "retrieval_slides",
          "pretrain_plus_mil_wall_s_per_fold"]
  with open(os.path.join(args.out, "study.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
      w.writerow([_f(r.get(c), 4) if isinstance(r.get(c), float) else r.get(c, "") for c in cols])
  md = ["| setting | MIL | folds | pooled OOF AUC [95 % CI] | bal. acc. | pooled AUC, temp. | Brier (raw / temp.) "
        "| ECE (raw / temp.) | fold AUC mean ± std | promyelocyte AP / recall@20 (APL slides) | s per fold |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['setting']} | {r['aggregator']} | {r['folds']} | {_f(r['pooled_auc'])} [{_f(r['ci_lo'])}, "
              f"{_f(r['ci_hi'])}] | {_f(r['balanced_accuracy'])} | {_f(r.get('pooled_auc_temp'))} | "
              f"{_f(r['brier'])} / {_f(r.get('brier_temp'))} | "
              f"{_f(r.get('ece'))} / {_f(r.get('ece_temp'))} | {_f(r['fold_auc_mean'])} ± {_f(r['fold_auc_std'])} | "
              f"{_f(r.get('promyelocyte_ap'))} / {_f(r.get('promyelocyte_recall_at_k'))} ({r.get('retrieval_slides')})"
              f" | {_f(r['pretrain_plus_mil_wall_s_per_fold'], 0)} |")
  with open(os.path.join(args.out, "study.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  with open(os.path.join(args.out, "study_seeds.md"), "w") as f:
    f.write(seed_table(seed_summary(rows)))
  with open(os.path.join(args.out, "study_factors.md"), "w") as f:
    f.write(factor_tables(rows, seed_summary(rows)))
  print("\n".join(md))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
  for i, r in enumerate(rows):
    ax.errorbar(r["pooled_auc"], i, xerr=[[r["pooled_auc"] - r["ci_lo"]], [r["ci_hi"] - r["pooled_auc"]]], fmt="o",
                color="C0" if "meanpool" not in r["setting"] else "C2", capsize=3)
  ax.axvline(0.85, color="C3", ls="--", lw=1, label="goal 0.85")
  ax.axvline(0.5, color="grey", ls=":", lw=1)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{r['setting']} ({r['aggregator']})" for r in rows], fontsize=8)
  ax.set_xlabel("pooled out-of-fold AUC, 95 % CI (DeLong)")
  ax.set_xlim(0.3, 1.0)
  ax.legend(loc="lower left", fontsize=8)
  fig.tight_layout()
  fig.subplots_adjust(bottom=max(0.05, 0.6 / (0.45 * len(rows) + 1.2)))
  fig.savefig(os.path.join(args.out, "study.png"), dpi=110)
  return 0


if __name__ == "__main__":
  sys.exit(main())
