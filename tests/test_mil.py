"""MIL models: masking/padding invariance, a tiny fit, selection, the `mil` stage."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from slamags_jax import config, metrics, mil
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

MODELS = ("abmil", "pamil", "mean")


def _mil_cfg(model: str, **overrides):
  c = config.get_base_config().mil
  c.model = model
  c.hidden_dim, c.attention_dim, c.n_prototypes = 16, 8, 4
  c.lr, c.epochs, c.bags_per_step = 1e-2, 10, 4
  for k, v in overrides.items():
    c[k] = v
  return c


def clustered_bags(rng: np.random.Generator, n_bags: int, dim: int = 16, centres=None,
                   prefix: str = "b", split: str = "train") -> list[dict]:
  """Cells around 5 'normal type' centres; positives hold ~1/8 cells of a 6th centre."""
  bags = []
  for i in range(n_bags):
    y = i % 2
    n = int(rng.integers(12, 40))
    e = centres[rng.integers(0, 5, n)] + 0.5 * rng.normal(size=(n, dim))
    inst = np.zeros(n, np.int64)
    if y:
      k = max(1, n // 8)
      idx = rng.choice(n, k, replace=False)
      e[idx] = centres[5] + 0.5 * rng.normal(size=(k, dim))
      inst[idx] = 1
    bags.append({"id": f"{prefix}{i:03d}", "split": split, "label": y, "k": int(inst.sum()),
                 "embeddings": e.astype(np.float32), "cell_ids": np.arange(n, dtype=np.int64) + 1000 * i,
                 "inst": inst})
  return bags


@pytest.mark.parametrize("model_name", MODELS)
def test_padding_changes_nothing(model_name):
  """A bag alone == the same bag padded (with garbage) inside a batch: outputs and grads."""
  cfg = _mil_cfg(model_name)
  model = mil.make_model(cfg)
  rng = np.random.default_rng(0)
  d, n = 6, 5
  params = mil.init_model(model, jax.random.PRNGKey(1), d)
  bag = rng.normal(size=(n, d)).astype(np.float32)
  other = rng.normal(size=(9, d)).astype(np.float32)

  alone = {"x": bag[None], "mask": np.ones((1, n), bool), "y": np.array([1], np.int32),
           "w": np.ones(1, np.float32)}
  batch = mil.pad_batch([{"embeddings": bag, "label": 1}, {"embeddings": other, "label": 0}],
                        length=16, batch_size=3)
  batch["x"] = np.where(batch["mask"][..., None], batch["x"],
                        rng.normal(size=batch["x"].shape) * 100).astype(np.float32)
  batch["x"][2] = np.nan  # an empty padding slot full of garbage
  batch["w"] = np.array([1, 0, 0], np.float32)  # the loss of the first bag only

  apply = jax.jit(lambda x, m: model.apply({"params": params}, x, m))
  out_a, out_b = apply(alone["x"], alone["mask"]), apply(batch["x"], batch["mask"])
  np.testing.assert_allclose(out_a["logits"][0], out_b["logits"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_a["attention"][0], out_b["attention"][0, :n], rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(out_b["attention"])[~batch["mask"]] == 0.0)  # exactly zero
  assert np.all(np.asarray(out_b["attention_branches"])[~batch["mask"]] == 0.0)
  assert np.isfinite(np.asarray(out_b["logits"])).all()
  np.testing.assert_allclose(np.asarray(out_b["attention"]).sum(-1), [1, 1, 0], rtol=1e-5, atol=1e-6)
  for key in ("cluster", "proto_cluster"):
    np.testing.assert_allclose(out_a["aux"][key][0], out_b["aux"][key][0], rtol=1e-5, atol=1e-6)

  @jax.jit
  def grads(b):
    def loss_fn(p, x):
      return mil.bag_loss(model, p, {**b, "x": x}, 0.5)[0]
    return jax.grad(loss_fn, argnums=(0, 1))(params, b["x"])

  (gp_a, gx_a), (gp_b, gx_b) = grads(alone), grads(batch)
  flat_a, flat_b = jax.tree_util.tree_leaves(gp_a), jax.tree_util.tree_leaves(gp_b)
  assert len(flat_a) == len(flat_b)
  for ga, gb in zip(flat_a, flat_b):
    assert np.isfinite(np.asarray(gb)).all()
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gx_a[0], gx_b[0, :n], rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(gx_b)[0, n:] == 0.0) and np.all(np.asarray(gx_b)[2] == 0.0)


def test_mean_pool_is_a_linear_classifier_of_the_mean_embedding():
  model = mil.make_model(_mil_cfg("mean"))
  params = mil.init_model(model, jax.random.PRNGKey(2), 6)
  x = np.random.default_rng(3).normal(size=(1, 7, 6)).astype(np.float32)
  out = model.apply({"params": params}, x, np.ones((1, 7), bool))
  w, b = np.asarray(params["classifier"]["kernel"]), np.asarray(params["classifier"]["bias"])
  np.testing.assert_allclose(out["logits"][0], x[0].mean(0) @ w + b, rtol=1e-5, atol=1e-6)
  score = x[0] @ w  # per-cell evidence; the attention ranks cells by the abnormal class's share of it
  rank = np.argsort(-(score[:, 1] - score.mean(1)))
  np.testing.assert_array_equal(np.argsort(-np.asarray(out["attention"][0])), rank)


@pytest.mark.parametrize("model_name", ("abmil", "pamil"))  # attention models (mean pooling cannot find 1/8 witnesses)
def test_tiny_fit_separates_bags_and_ranks_witnesses_first(model_name):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 16))
  train = clustered_bags(rng, 32, centres=centres)
  val = clustered_bags(rng, 8, centres=centres, prefix="v", split="val")
  test = clustered_bags(rng, 8, centres=centres, prefix="t", split="test")
  cfg = _mil_cfg(model_name)
  fit = mil.train_mil(train, val, cfg, jax.random.PRNGKey(0), progress=False)
  assert len(fit.history) == cfg.epochs
  assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
  pred = mil.predict(mil.make_model(cfg), fit.params, test)
  assert metrics.bag_metrics([b["label"] for b in test], pred["prob"])["auc"] == 1.0
  for a, b in zip(pred["attention"], test):
    assert a.shape == (len(b["inst"]),)
    assert a.sum() == pytest.approx(1.0, abs=1e-5)
    if b["label"]:
      # Every witness outranks every normal cell of its bag.
      assert a[b["inst"] == 1].min() > a[b["inst"] == 0].max()
      assert metrics.average_precision(a, b["inst"]) == 1.0


def test_training_is_deterministic_for_a_key():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(6, 8))
  train = clustered_bags(rng, 6, dim=8, centres=centres)
  cfg = _mil_cfg("abmil", epochs=2, bags_per_step=4, dropout=0.1, selection="last_epoch")  # incl. a padded last step
  a = mil.train_mil(train, [], cfg, jax.random.PRNGKey(3), progress=False)
  b = mil.train_mil(train, [], cfg, jax.random.PRNGKey(3), progress=False)
  assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert a.best_epoch == 2 and a.selection.startswith("last epoch (mil.selection=last_epoch")


def test_no_validation_bags_is_an_error_unless_last_epoch_is_asked_for():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(6, 8))
  train = clustered_bags(rng, 6, dim=8, centres=centres)
  val = clustered_bags(rng, 4, dim=8, centres=centres, prefix="v", split="val")
  with pytest.raises(UserError, match="mil.selection=last_epoch"):
    mil.train_mil(train, [], _mil_cfg("abmil", epochs=2), jax.random.PRNGKey(0), progress=False)
  # Asked for: the last epoch, even with validation bags (which are still scored and logged).
  fit = mil.train_mil(train, val, _mil_cfg("abmil", epochs=3, selection="last_epoch"), jax.random.PRNGKey(0),
                      progress=False)
  assert fit.best_epoch == 3 and "4 validation bags scored, not used" in fit.selection
  assert all("val_auc" in r for r in fit.history)


def test_val_loss_selection_picks_the_lowest_validation_cross_entropy():
  rng = np.random.default_rng(6)
  centres = rng.normal(size=(6, 8))
  train = clustered_bags(rng, 6, dim=8, centres=centres)
  val = clustered_bags(rng, 4, dim=8, centres=centres, prefix="v", split="val")
  fit = mil.train_mil(train, val, _mil_cfg("abmil", epochs=4, selection="val_loss"), jax.random.PRNGKey(0),
                      progress=False)
  losses = [r["val_loss"] for r in fit.history]
  assert fit.best_epoch == 1 + int(np.argmin(losses)) and fit.selection.startswith("lowest validation cross-entropy")
  with pytest.raises(UserError, match="no validation bags"):
    mil.train_mil(train, [], _mil_cfg("abmil", epochs=1, selection="val_loss"), jax.random.PRNGKey(0), progress=False)


def test_selection_rule():
  key = mil.train._selection_key
  assert mil.train._better(key(0.9, 0.5), None)
  assert mil.train._better(key(0.95, 0.9), key(0.9, 0.1))  # higher AUC wins
  assert mil.train._better(key(0.9, 0.4), key(0.9, 0.5))  # equal AUC: lower loss wins
  assert not mil.train._better(key(0.9, 0.5), key(0.9, 0.5))  # full tie: the earlier stays
  assert mil.train._better(key(0.5, 0.9), key(float("nan"), 0.1))  # undefined AUC ranks last
  assert mil.train._better(key(float("nan"), 0.1), key(float("nan"), 0.2))


def test_bucket_length_and_pad_batch():
  assert mil.bucket_length(1) == 32 and mil.bucket_length(32) == 32 and mil.bucket_length(33) == 64
  b = mil.pad_batch([{"embeddings": np.ones((3, 2), np.float32), "label": 1}], length=4, batch_size=2)
  assert b["x"].shape == (2, 4, 2) and b["mask"].sum() == 3
  assert b["w"].tolist() == [1.0, 0.0] and b["y"].tolist() == [1, 0]


def write_embeddings(workdir: str, bags: list[dict], dim: int) -> None:
  index = []
  for b in bags:
    fileio.save_npz(os.path.join(workdir, "embeddings", f"{b['id']}.npz"),
                    embeddings=b["embeddings"], cell_ids=b["cell_ids"])
    index.append({"id": b["id"], "split": b["split"], "label": b["label"], "k": b["k"],
                  "file": f"{b['id']}.npz", "n": len(b["cell_ids"])})
  fileio.write_json(os.path.join(workdir, "embeddings", "index.json"),
                    {"dim": dim, "embedding": "head", "bags": index})


@pytest.mark.e2e
def test_mil_stage_without_validation_bags(tmp_path):
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(6, 8))
  bags = clustered_bags(rng, 8, dim=8, centres=centres) + \
      clustered_bags(rng, 4, dim=8, centres=centres, prefix="t", split="test")
  write_embeddings(str(tmp_path), bags, 8)
  cfg = config.get_base_config()
  cfg.mil.epochs, cfg.mil.hidden_dim, cfg.mil.attention_dim, cfg.mil.bags_per_step = 3, 8, 4, 2
  with pytest.raises(UserError, match="no validation bags"):  # never silently the last epoch
    mil.run(cfg, str(tmp_path))
  cfg.mil.selection = "last_epoch"
  mil.run(cfg, str(tmp_path))
  out = tmp_path / "mil"
  s = fileio.read_json(out / "summary.json")
  assert s["no_validation"] and s["selection"].startswith("last epoch") and s["best_epoch"] == 3
  assert s["n_bags"] == {"train": 8, "val": 0, "test": 4}
  assert s["train_bags_per_s"] > 0 and s["infer_bags_per_s"] > 0
  assert s["checkpoint_steps"] == [3]
  assert len(fileio.read_jsonl(out / "metrics.jsonl")) == 3
  preds = mil.load_predictions(str(tmp_path))
  assert [p["id"] for p in preds] == [b["id"] for b in bags]
  for p, b in zip(preds, bags):
    np.testing.assert_array_equal(p["cell_ids"], b["cell_ids"])
    assert p["attention"].sum() == pytest.approx(1.0, abs=1e-5)
  # The best (= last) checkpoint restores and reproduces the stored predictions.
  params, meta = mil.load_checkpoint(str(tmp_path), "best")
  assert meta["roles"] == ["best", "last"] and meta["input_dim"] == 8 and meta["model"] == "pamil"
  assert len(meta["input_mean"]) == 8 and len(meta["input_std"]) == 8  # standardisation travels with it
  again = mil.predict(mil.make_model(cfg.mil), params, mil.prepare_inputs(bags, meta))
  np.testing.assert_allclose(again["prob"], [p["prob"] for p in preds], rtol=1e-5, atol=1e-6)


def test_mil_stage_temperature_scaling_is_fitted_on_validation_and_travels_with_the_checkpoint(tmp_path):
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(6, 8))
  bags = clustered_bags(rng, 8, dim=8, centres=centres) + \
      clustered_bags(rng, 6, dim=8, centres=centres, prefix="v", split="val") + \
      clustered_bags(rng, 4, dim=8, centres=centres, prefix="t", split="test")
  write_embeddings(str(tmp_path), bags, 8)
  cfg = config.get_base_config()
  cfg.mil.epochs, cfg.mil.hidden_dim, cfg.mil.attention_dim, cfg.mil.bags_per_step = 4, 8, 4, 2
  cfg.mil.temperature_scaling = True
  mil.run(cfg, str(tmp_path))
  s = fileio.read_json(tmp_path / "mil" / "summary.json")
  t = s["temperature"]
  assert t > 0
  params, meta = mil.load_checkpoint(str(tmp_path), "best")
  assert meta["temperature"] == pytest.approx(t)
  preds = mil.load_predictions(str(tmp_path))
  with np.load(tmp_path / "mil" / "predictions.npz") as z:
    logits = z["logits"].astype(np.float64) / t  # the raw logits are kept
  want = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
  np.testing.assert_allclose(np.stack([p["probs"] for p in preds]), want, atol=1e-5)
  raw = mil.predict(mil.make_model(cfg.mil), params, mil.prepare_inputs(bags, meta))
  assert [p["pred"] for p in preds] == raw["pred"].tolist()  # calls unchanged


def test_loader_rejects_bad_inputs(tmp_path):
  with pytest.raises(UserError, match="embed stage"):
    mil.load_embedded_bags(str(tmp_path))
  bag = {"id": "train-000", "split": "train", "label": 1, "k": 1,
         "embeddings": np.array([[0.0, np.nan]], np.float32), "cell_ids": np.array([0])}
  write_embeddings(str(tmp_path), [bag], 2)
  with pytest.raises(UserError, match="NaN"):
    mil.load_embedded_bags(str(tmp_path))


def test_tier_length():
  assert [mil.tier_length(n, 224) for n in (1, 32, 33, 64, 65, 200)] == [32, 32, 64, 64, 128, 224]
  assert mil.tier_length(10_001, mil.bucket_length(10_001)) == 10_016  # capped at the largest bag's bucket
  assert mil.tier_length(5000, 10_016) == 8192


def test_multiclass_fit_with_bags_of_very_different_sizes():
  """Three classes (one marker cell type per non-normal class), bags of 12 and 300 cells; per-class attention."""
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(7, 8)) * 2
  bags = []
  for i in range(24):
    y = i % 3
    n = 12 if (i // 3) % 2 else 300  # every class has small and large bags
    e = centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=(n, 8))
    if y:
      e[: max(2, n // 6)] = centres[4 + y] + 0.3 * rng.normal(size=(max(2, n // 6), 8))
    bags.append({"id": f"b{i}", "label": y, "embeddings": e.astype(np.float32)})
  cfg = _mil_cfg("pamil", epochs=6, bags_per_step=1, lr=2e-2, selection="last_epoch")
  fit = mil.train_mil(bags[:18], [], cfg, jax.random.PRNGKey(0), progress=False, num_classes=3)
  model = mil.make_model(cfg, 3)
  pred = mil.predict(model, fit.params, bags)
  assert pred["probs"].shape == (24, 3) and np.allclose(pred["probs"].sum(1), 1.0)
  assert pred["pred"].tolist() == pred["probs"].argmax(1).tolist()
  assert [a.shape[0] for a in pred["attention"]] == [b["embeddings"].shape[0] for b in bags]
  assert all(br.shape[1] == 3 for br in pred["attention_branches"])
  for a, br, c in zip(pred["attention"], pred["attention_branches"], pred["pred"]):
    np.testing.assert_array_equal(a, br[:, c])  # ranking attention: the called class's branch
  assert metrics.class_metrics([b["label"] for b in bags[:18]], pred["probs"][:18], 3)["accuracy"] == 1.0
  # A small bag scored alone (its own tier) equals it scored with the 300-cell bags.
  alone = mil.predict(model, fit.params, bags[:1])
  np.testing.assert_allclose(alone["probs"][0], pred["probs"][0], atol=1e-6)
  m = mil.split_metrics(bags, pred)
  assert set(m) == {"loss", "auc", "accuracy", "f1"} and np.isfinite(m["auc"])
