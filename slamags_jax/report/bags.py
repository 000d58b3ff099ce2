"""The simulated-bags report's numbers and text: joining predictions to the manifest, metrics, summary, markdown.

Metric definitions (ties, K larger than a bag) are those of ``slamags_jax.metrics``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from slamags_jax import metrics
from slamags_jax.report.tables import fmt, found, md_table, pm
from slamags_jax.runtime.errors import UserError

REQUIRED_KEYS = ("method", "witness_rate", "seed", "bag_f1", "bag_auc", "bag_accuracy", "topk_k",
                 "topk_found_mean", "recall_at_k_mean", "retrieval_ap_mean")
SPLITS = ("train", "val", "test")


def join(predictions: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> list[dict[str, Any]]:
  """Adds each cell's instance label, class and path (from the manifest) to the bags."""
  cells = {int(c["id"]): c for c in manifest["cells"]}
  out = []
  for p in predictions:
    missing = [int(c) for c in p["cell_ids"] if int(c) not in cells]
    if missing:
      raise UserError(f"bag {p['id']}: cell {missing[0]} is not in the bags manifest; the embeddings "
                      "were made from another manifest (rerun the embed and mil stages)")
    entries = [cells[int(c)] for c in p["cell_ids"]]
    out.append({**p,
                "instance_labels": np.asarray([int(e["label"]) for e in entries], np.int64),
                "classes": [str(e.get("class", "")) for e in entries],
                "paths": [str(e["path"]) for e in entries]})
  return out


def evaluate(test_bags: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
  """Bag metrics and per-positive-bag retrieval metrics of joined test bags."""
  bag = metrics.bag_metrics([b["label"] for b in test_bags], [b["prob"] for b in test_bags])
  per_bag = []
  for b in test_bags:
    if b["label"] != 1:
      continue
    r = metrics.retrieval_metrics(b["attention"], b["instance_labels"], k)
    r.update({"bag": b["id"], "prob": b["prob"], "pred": b["pred"]})
    br = b.get("attention_branches")
    if br is not None and br.ndim == 2 and br.shape[1] == 2:  # PAMIL: normal-class branch too
      r["average_precision_normal_branch"] = metrics.average_precision(br[:, 0], b["instance_labels"])
    per_bag.append(r)
  return {"bag": bag, "per_bag": per_bag, "retrieval": metrics.mean_retrieval(per_bag)}


def abnormal_name(manifest: dict[str, Any]) -> str:
  """The abnormal classes' names, for the gallery's legend."""
  names = sorted({str(c.get("class", "")) for c in manifest["cells"] if int(c["label"]) == 1})
  return ", ".join(n for n in names if n) or "abnormal cell"


def _random_baseline(pos: Sequence[dict[str, Any]], k: int) -> dict[str, float]:
  """What a uniformly shuffled ranking gives in expectation on the positive bags."""
  rand_found = [min(k, len(b["attention"])) * b["instance_labels"].sum() / len(b["attention"]) for b in pos]
  rand_rec = [min(k, len(b["attention"])) / len(b["attention"]) for b in pos]
  rand_ap = [b["instance_labels"].sum() / len(b["attention"]) for b in pos]
  return {"random_topk_found_mean": metrics.nanmean(rand_found),
          "random_recall_at_k_mean": metrics.nanmean(rand_rec),
          "random_ap_mean": metrics.nanmean(rand_ap)}


def summarize_test(cfg: Any, manifest: dict[str, Any], mil_summary: dict[str, Any], test: Sequence[dict[str, Any]],
                 ev: dict[str, Any], k: int) -> dict[str, Any]:
  """The summary's settings, test-bag metrics and per-bag rows (``ev`` = ``evaluate(test, k)``)."""
  per_bag, ret, bag = ev["per_bag"], ev["retrieval"], ev["bag"]
  pos = [b for b in test if b["label"] == 1]
  counts = {sp: sum(1 for b in manifest["bags"] if b["split"] == sp) for sp in SPLITS}
  pos_counts = {sp: sum(1 for b in manifest["bags"] if b["split"] == sp and b["label"] == 1) for sp in SPLITS}
  summary: dict[str, Any] = {
      "method": cfg.pretrain.method, "witness_rate": float(cfg.bags.witness_rate), "seed": int(cfg.seed),
      "bag_f1": bag["f1"], "bag_auc": bag["auc"], "bag_accuracy": bag["accuracy"],
      "topk_k": k,
      "topk_found_mean": ret["topk_found_mean"], "topk_found_std": ret["topk_found_std"],
      "recall_at_k_mean": ret["recall_at_k_mean"], "recall_at_k_std": ret["recall_at_k_std"],
      "retrieval_ap_mean": ret["average_precision_mean"], "retrieval_ap_std": ret["average_precision_std"],
      **_random_baseline(pos, k),
      "mil_model": mil_summary.get("model", cfg.mil.model),
      "mil_best_epoch": mil_summary.get("best_epoch"),
      "mil_selection": mil_summary.get("selection"),
      "mil_val_at_best": mil_summary.get("val_at_best"),
      "mil_train_wall_s": mil_summary.get("train_wall_s"),
      "n_test_bags": len(test), "n_pos_test_bags": len(pos),
      "n_bags": counts, "n_pos_bags": pos_counts,
      "test_bag_size_mean": float(np.mean([len(b["attention"]) for b in test])),
      "witnesses_per_pos_bag_mean": metrics.nanmean([float(b["instance_labels"].sum()) for b in pos]),
      "per_bag": [{kk: r[kk] for kk in ("bag", "n", "n_witnesses", "prob", "pred", "topk_found",
                                        "recall_at_k", "average_precision")} for r in per_bag],
  }
  if any("average_precision_normal_branch" in r for r in per_bag):
    summary["retrieval_ap_mean_normal_branch"] = metrics.nanmean(
        [r.get("average_precision_normal_branch", float("nan")) for r in per_bag])
  return summary


def summarize_val(val: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
  """Validation-bag metrics, for model and setting selection (never the test bags); {} without val bags."""
  if not val:
    return {}
  ev_val = evaluate(val, k)
  return {"val_bag_auc": ev_val["bag"]["auc"], "val_bag_f1": ev_val["bag"]["f1"],
          "val_topk_found_mean": ev_val["retrieval"]["topk_found_mean"],
          "val_recall_at_k_mean": ev_val["retrieval"]["recall_at_k_mean"],
          "val_retrieval_ap_mean": ev_val["retrieval"]["average_precision_mean"],
          "n_val_bags": len(val)}


def summarize_pretrain(pre: dict[str, Any]) -> dict[str, Any]:
  """The pretraining summary's keys the report carries (those present and not None)."""
  out = {key: pre[key] for key in ("final_effective_rank", "final_head_effective_rank",
                                   "final_pooled_effective_rank", "conflict_fraction", "mean_task_cosine",
                                   "collapsed", "collapse") if pre.get(key) is not None}
  if pre.get("wall_s") is not None:
    out["pretrain_wall_s"] = pre["wall_s"]
  if pre.get("steps") is not None:
    out["pretrain_steps"] = pre["steps"]
  return out


# ----------------------------------------------------------------------------- markdown


def _collapse_cell(s: dict[str, Any]) -> str:
  if s.get("collapsed") is None:
    return "n/a"
  if not s["collapsed"]:
    return "no"
  return "**yes**: " + "; ".join((s.get("collapse") or {}).get("reasons", []))


def _settings_table(s: dict[str, Any]) -> str:
  return md_table(["setting", "value"], [
      ["pretraining method", f"`{s['method']}`"],
      ["witness rate", f"{100 * s['witness_rate']:g}%"],
      ["seed", s["seed"]],
      ["MIL aggregator", f"`{s['mil_model']}`"],
      ["MIL selected epoch", f"{fmt(s.get('mil_best_epoch'))} ({s.get('mil_selection', 'n/a')})"],
      ["bags (train / val / test)", " / ".join(
          f"{s['n_bags'][sp]} ({s['n_pos_bags'][sp]} abnormal)" for sp in SPLITS)],
      ["cells per test bag (mean)", fmt(s.get("test_bag_size_mean"), 1)],
      ["witnesses per positive test bag (mean)", fmt(s.get("witnesses_per_pos_bag_mean"), 1)],
      ["K (top-K retrieval)", s["topk_k"]],
      ["pretraining wall time (s)", fmt(s.get("pretrain_wall_s"), 1)],
      ["final effective rank of embeddings", fmt(s.get("final_effective_rank"), 2)],
      ["effective rank of the head / pooled features",
       f"{fmt(s.get('final_head_effective_rank'), 2)} / {fmt(s.get('final_pooled_effective_rank'), 2)}"],
      ["mean task-gradient cosine / conflict fraction",
       f"{fmt(s.get('mean_task_cosine'))} / {fmt(s.get('conflict_fraction'))}"],
      ["pretraining collapsed", _collapse_cell(s)],
  ])


def _retrieval_table(s: dict[str, Any]) -> str:
  k = s["topk_k"]
  return md_table(["ranking", f"found in top {k}", f"recall@{k}", "AP"], [
      ["MIL attention", pm(s["topk_found_mean"], s["topk_found_std"], 2),
       pm(s["recall_at_k_mean"], s["recall_at_k_std"]), pm(s["retrieval_ap_mean"], s["retrieval_ap_std"])],
      ["random ranking", fmt(s.get("random_topk_found_mean"), 2), fmt(s.get("random_recall_at_k_mean")),
       f"≈ {fmt(s.get('random_ap_mean'))} (witness fraction)"],
  ])


CAPTIONS = {
    "topk_gallery": "Top-ranked cells of positive test bags (red frame = true witness)",
    "attention_hist": "Attention of witness vs normal cells, and witnesses found vs cells reviewed",
    "roc": "ROC curve of the test bags",
    "pretrain_loss": "Pretraining curves",
}


def markdown(s: dict[str, Any], per_bag: Sequence[dict[str, Any]], pictures: dict[str, str]) -> str:
  """The human-readable report (``s`` = the summary dict)."""
  k = s["topk_k"]
  md = [f"# SLAM-AGS report: `{s['method']}`, witness rate {100 * s['witness_rate']:g}%, seed {s['seed']}\n",
        "Slide (bag) classification and abnormal-cell retrieval on the held-out test bags. "
        "Abnormal = positive class; a bag is called abnormal when p(abnormal) >= 0.5. "
        "Cells are ranked by the MIL model's abnormal-class attention.\n",
        "## Run settings\n", _settings_table(s),
        "## Bag classification (test)\n",
        md_table(["F1 (abnormal)", "ROC-AUC", "accuracy", "test bags"],
                 [[fmt(s["bag_f1"]), fmt(s["bag_auc"]), fmt(s["bag_accuracy"]),
                   f"{s['n_test_bags']} ({s['n_pos_bags']['test']} abnormal)"]]),
        f"## Abnormal-cell retrieval (positive test bags, K = {k})\n",
        "Mean ± standard deviation over the positive test bags. *Found in top K*: true witnesses among "
        "the K cells with the highest attention (K is cut to the bag size; tied attention at the "
        "K-th place counts fractionally). *Recall@K*: found / witnesses in the bag. *AP*: average "
        "precision of the whole ranking. The random-ranking row is what a uniformly shuffled "
        "ranking gives in expectation.\n",
        _retrieval_table(s)]
  if s.get("collapsed"):
    md.insert(1, "> **Pretraining collapsed** (" + "; ".join(s["collapse"].get("reasons", [])) + "): the "
              "embeddings carry little information, so the numbers below are close to what an "
              "untrained encoder gives. See `pretrain/summary.json` (`collapse`) and the README's "
              "methods section for settings that avoid it.\n")
  if s.get("retrieval_ap_mean_normal_branch") is not None:
    md.append(f"Diagnostic (PAMIL): AP of the *normal-class* attention branch = "
              f"{fmt(s['retrieval_ap_mean_normal_branch'])}. PAMIL's per-class attention is not tied to "
              "a class by the loss; if this is high while the abnormal-class AP is low, the model "
              "detects witnesses with the other branch.\n")
  md.append("## Pictures\n")
  for name, fname in pictures.items():
    md.append(f"### {CAPTIONS.get(name, name)}\n\n![{CAPTIONS.get(name, name)}]({fname})\n")
  md.append("## Positive test bags\n")
  md.append(md_table(
      ["bag", "cells", "witnesses", "p(abnormal)", "called", f"found in top {k}", f"recall@{k}", "AP"],
      [[b["bag"], b["n"], b["n_witnesses"], f"{b['prob']:.3f}", "abnormal" if b["pred"] else "normal",
        found(b["topk_found"]), fmt(b["recall_at_k"]), fmt(b["average_precision"])] for b in per_bag]))
  md.append("\nPer-cell values: `cells.csv`. Machine-readable summary: `summary.json`.\n")
  return "\n".join(md)
