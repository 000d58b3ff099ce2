"""Bag and retrieval metrics against small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slamags_jax import metrics


def test_retrieval_plain_ranking():
  # Ranking (desc): w, n, w, n, n. Top 2 holds 1 witness of 2 -> recall 0.5.
  # AP = mean of precision at each witness: (1/1 + 2/3) / 2 = 5/6.
  r = metrics.retrieval_metrics([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0], k=2)
  assert r["topk_found"] == 1.0
  assert r["recall_at_k"] == 0.5
  assert r["average_precision"] == pytest.approx(5 / 6)
  assert (r["n"], r["n_witnesses"], r["k"], r["k_eff"]) == (5, 2, 2, 2)


def test_retrieval_ties_at_the_k_boundary_count_fractionally():
  # Scores 0.9 (n) > 0.5, 0.5, 0.5 (one witness among the three) > 0.1 (w); K = 2.
  # One cell is strictly above the K-th score (0 witnesses); 1 slot is left for the 3
  # tied cells, 1 of which is a witness -> expected found = 0 + 1 * 1/3.
  s, y = [0.9, 0.5, 0.5, 0.5, 0.1], [0, 1, 0, 0, 1]
  assert metrics.topk_found(s, y, 2) == pytest.approx(1 / 3)
  # K = 4 takes the whole tied block: 1 witness found.
  assert metrics.topk_found(s, y, 4) == pytest.approx(1.0)
  # AP with ties = one threshold per distinct score (sklearn):
  #   >= 0.9: P = 0/1, R = 0;  >= 0.5: P = 1/4, R = 1/2;  >= 0.1: P = 2/5, R = 1.
  #   AP = (1/2 - 0) * 1/4 + (1 - 1/2) * 2/5 = 0.125 + 0.2 = 0.325.
  assert metrics.average_precision(s, y) == pytest.approx(0.325)


def test_retrieval_does_not_depend_on_input_order_under_ties():
  s, y = np.array([0.5, 0.5, 0.5, 0.5, 0.9]), np.array([1, 0, 0, 0, 0])
  for perm in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 2, 0, 4, 3]):
    r = metrics.retrieval_metrics(s[perm], y[perm], k=3)
    # 0.9 is above; 2 slots for the 4 tied cells (1 witness) -> 2/4.
    assert r["topk_found"] == pytest.approx(0.5)


def test_retrieval_single_witness():
  # The witness ranks 2nd of 3: not in the top 1, in the top 2; AP = precision at
  # rank 2 = 1/2.
  s, y = [0.1, 0.4, 0.3], [0, 0, 1]
  assert metrics.retrieval_metrics(s, y, 1)["topk_found"] == 0.0
  assert metrics.retrieval_metrics(s, y, 1)["recall_at_k"] == 0.0
  r = metrics.retrieval_metrics(s, y, 2)
  assert r["topk_found"] == 1.0 and r["recall_at_k"] == 1.0
  assert r["average_precision"] == pytest.approx(0.5)


def test_retrieval_k_larger_than_the_bag():
  # K = 10 > 3 cells: K is cut to the bag size; every witness is found.
  r = metrics.retrieval_metrics([0.2, 0.1, 0.7], [1, 1, 0], k=10)
  assert r["k_eff"] == 3 and r["k"] == 10
  assert r["topk_found"] == 2.0 and r["recall_at_k"] == 1.0
  # Ranking: n (0.7), w (0.2), w (0.1): AP = (1/2 + 2/3) / 2 = 7/12.
  assert r["average_precision"] == pytest.approx(7 / 12)


def test_retrieval_all_equal_attention():
  # 4 cells, 1 witness, all scores equal, K = 2: 2 slots for 4 tied cells -> 2 * 1/4.
  # AP: one threshold holding everything: precision 1/4 at recall 1 -> 0.25.
  r = metrics.retrieval_metrics([0.25] * 4, [0, 0, 1, 0], k=2)
  assert r["topk_found"] == pytest.approx(0.5)
  assert r["recall_at_k"] == pytest.approx(0.5)
  assert r["average_precision"] == pytest.approx(0.25)


def test_retrieval_without_witnesses_is_nan_and_skipped_by_means():
  r = metrics.retrieval_metrics([0.3, 0.7], [0, 0], k=1)
  assert r["topk_found"] == 0.0
  assert math.isnan(r["recall_at_k"]) and math.isnan(r["average_precision"])
  m = metrics.mean_retrieval([r, {"topk_found": 2.0, "recall_at_k": 1.0, "average_precision": 0.5}])
  # topk_found has both values (0 and 2); the others only the finite one.
  assert m["topk_found_mean"] == 1.0 and m["topk_found_std"] == 1.0
  assert m["recall_at_k_mean"] == 1.0 and m["average_precision_mean"] == 0.5
  assert math.isnan(metrics.mean_retrieval([])["recall_at_k_mean"])


def test_bag_metrics_hand_case():
  # Threshold 0.5: predictions 1, 1, 0, 0, 1 for labels 1, 0, 1, 0, 1 (0.5 counts as abnormal).
  # TP = 2 (bags 0, 4), FP = 1 (bag 1), FN = 1 (bag 2), TN = 1 -> F1 = 2*2 / (2*2 + 1 + 1) = 2/3,
  # accuracy 3/5. AUC: positives {0.9, 0.4, 0.5}, negatives {0.6, 0.1}; pairs ranked right:
  # 0.9 beats both, 0.4 beats 0.1 only, 0.5 beats 0.1 only -> 4 of 6 = 2/3.
  m = metrics.bag_metrics([1, 0, 1, 0, 1], [0.9, 0.6, 0.4, 0.1, 0.5])
  assert m["f1"] == pytest.approx(2 / 3)
  assert m["accuracy"] == pytest.approx(3 / 5)
  assert m["auc"] == pytest.approx(2 / 3)
  assert (m["n"], m["n_pos"]) == (5, 3)


def test_bag_auc_with_tied_probabilities():
  # Positive 0.5 vs negative 0.5 is a tie (counts 1/2); positive 0.8 beats it -> (1 + 0.5) / 2.
  assert metrics.roc_auc([1, 1, 0], [0.8, 0.5, 0.5]) == pytest.approx(0.75)


def test_bag_metrics_one_class_gives_nan_auc_not_an_error():
  m = metrics.bag_metrics([1, 1], [0.7, 0.2])
  assert math.isnan(m["auc"])
  assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(2 / 3)
  # No positives predicted or present: F1 defined as 0.
  assert metrics.bag_metrics([0, 0], [0.1, 0.2])["f1"] == 0.0


def test_stable_rank_order_and_json_safe():
  assert metrics.stable_rank_order([0.2, 0.5, 0.2, 0.9]).tolist() == [3, 1, 0, 2]
  out = metrics.json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)], "c": "x"})
  assert out == {"a": None, "b": [1.5, 2], "c": "x"}


def test_topk_found_curve_matches_topk_found_for_every_k():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 4, 30).astype(float)  # many ties
  y = (rng.random(30) < 0.3).astype(int)
  curve = metrics.topk_found_curve(s, y)
  assert curve == pytest.approx([metrics.topk_found(s, y, k) for k in range(1, 31)])
  # Hand case: [0.9 (n), 0.5 (w), 0.5 (n), 0.5 (n), 0.1 (w)] -> 0, 1/3, 2/3, 1, 2.
  assert metrics.topk_found_curve([0.9, 0.5, 0.5, 0.5, 0.1], [0, 1, 0, 0, 1]) == pytest.approx(
      [0, 1 / 3, 2 / 3, 1, 2])


def test_class_metrics_per_class_auc_macro_f1_and_confusion():
  y = [0, 0, 1, 1, 2, 2]
  p = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .8, .1], [.2, .7, .1], [.1, .2, .7], [.5, .1, .4]])
  m = metrics.class_metrics(y, p, 3)
  assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
  assert m["accuracy"] == pytest.approx(4 / 6)
  f1 = [2 / 4, 2 * 2 / (2 + 3), 2 / 3]  # 2TP / (2TP + FP + FN) per class
  assert [c["f1"] for c in m["per_class"]] == pytest.approx(f1)
  assert m["macro_f1"] == pytest.approx(np.mean(f1))
  for c in range(3):
    assert m["per_class"][c]["auc"] == pytest.approx(metrics.roc_auc((np.array(y) == c).astype(int), p[:, c]))
  assert m["macro_auc"] == pytest.approx(np.mean([c["auc"] for c in m["per_class"]]))
  absent = metrics.class_metrics([0, 0, 1], p[:3], 3)  # class 2 absent: its AUC is undefined, skipped
  assert np.isnan(absent["per_class"][2]["auc"]) and np.isfinite(absent["macro_auc"])
