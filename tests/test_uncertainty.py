"""report/uncertainty.py: DeLong's AUC interval against scikit-learn and a brute-force bootstrap; calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from slamags_jax.report import uncertainty as unc


def _scores(rng, m=22, n=60, shift=1.0, ties=False):
  pos, neg = rng.normal(shift, 1.0, m), rng.normal(0.0, 1.0, n)
  s = np.concatenate([pos, neg])
  if ties:
    s = np.round(s, 1)
  return np.r_[np.ones(m), np.zeros(n)].astype(int), s


@pytest.mark.parametrize("ties", [False, True])
def test_delong_auc_matches_sklearn(ties):
  rng = np.random.default_rng(0)
  for _ in range(5):
    y, s = _scores(rng, ties=ties)
    assert unc.delong_auc(y, s)["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def _slow_delong_var(y, s):
  """DeLong's variance from its definition (O(mn) kernel), for the test."""
  pos, neg = s[y == 1], s[y == 0]
  psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
  v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
  return np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)


def test_delong_variance_equals_the_definition_and_agrees_with_a_stratified_bootstrap():
  rng = np.random.default_rng(1)
  y, s = _scores(rng, ties=True)
  d = unc.delong_auc(y, s)
  assert d["var"] == pytest.approx(_slow_delong_var(y, s), rel=1e-10)
  # Brute force: the spread of the AUC over stratified resamples of the patients.
  boot = []
  pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
  for _ in range(3000):
    idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
    boot.append(roc_auc_score(y[idx], s[idx]))
  assert d["se"] == pytest.approx(np.std(boot), rel=0.15)
  lo, hi = unc.bootstrap_auc_ci(y, s, n_boot=1000, seed=0)
  assert abs(lo - d["ci95"][0]) < 0.05 and abs(hi - d["ci95"][1]) < 0.05
  assert d["ci95"][0] < d["auc"] < d["ci95"][1]


def test_delong_undefined_with_one_class_and_clipped_at_one():
  assert unc.delong_auc([1, 1, 1], [0.1, 0.2, 0.3])["ci95"] is None
  d = unc.delong_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2])
  assert d["auc"] == 1.0 and d["ci95"] == [1.0, 1.0]


def test_interval_covers_the_true_auc_about_95_percent():
  rng = np.random.default_rng(2)
  true_auc = 0.760250367  # Phi(1 / sqrt(2)) for a unit shift
  hits = 0
  for _ in range(300):
    y, s = _scores(rng, m=22, n=60)
    lo, hi = unc.delong_auc(y, s)["ci95"]
    hits += lo <= true_auc <= hi
  assert 0.89 <= hits / 300 <= 0.99


def test_temperature_recovers_the_softening_that_calibrates():
  rng = np.random.default_rng(3)
  n = 4000
  true_logits = rng.normal(0, 2.0, size=(n, 2))
  p = unc.apply_temperature(true_logits, 1.0)
  y = (rng.random(n) < p[:, 1]).astype(int)
  t = unc.fit_temperature(true_logits * 3.0, y)  # overconfident by 3x
  assert t == pytest.approx(3.0, rel=0.1)
  assert unc.nll(true_logits * 3.0, y, t) < unc.nll(true_logits * 3.0, y, 1.0)


def test_brier_reliability_and_pooled():
  y = np.array([0, 0, 1, 1])
  p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
  assert unc.brier(y, p) == pytest.approx(np.mean([0.02, 0.32, 0.18, 0.08]))
  bins = unc.reliability_bins(y == 1, p[:, 1], n_bins=2)
  assert [b["n"] for b in bins] == [2, 2] and bins[1]["observed"] == 1.0 and bins[0]["observed"] == 0.0
  rows = [{"slide_id": f"s{i}", "fold": i % 2, "label": ["AML", "APL"][int(t)], "probs": list(q)}
          for i, (t, q) in enumerate(zip(y, p))]
  pool = unc.pooled(rows, ["AML", "APL"])
  assert pool["bag_auc"] == 1.0 and pool["balanced_accuracy"] == 1.0 and pool["n_per_label"] == [2, 2]
  assert "Pooled out-of-fold" in unc.pooled_markdown(pool)


def test_multiclass_interval_is_a_bootstrap():
  rng = np.random.default_rng(4)
  y = np.repeat([0, 1, 2], 10)
  p = rng.dirichlet([1, 1, 1], size=30)
  p[np.arange(30), y] += 1.0
  p /= p.sum(axis=1, keepdims=True)
  out = unc.auc_with_ci(y, p)
  assert out["bag_auc_ci_method"].startswith("stratified bootstrap")
  assert out["bag_auc_ci95"][0] <= out["bag_auc"] <= out["bag_auc_ci95"][1]
