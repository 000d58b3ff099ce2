"""The pretraining step: per-task gradients, surgery, optimizer, determinism, skips, checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamags_jax import config as config_lib, losses, models, pretrain, surgery
from slamags_jax.runtime import checkpoints
from slamags_jax.data import device_augment

SIZE = 16
MEAN, STD = (0.6, 0.55, 0.74), (0.2, 0.24, 0.11)


def _cfg(method="slam_ags"):
  cfg = config_lib.get_base_config()
  cfg.pretrain.method = method
  cfg.model.width = 4
  cfg.model.head_dim = 16
  cfg.pretrain.lr = 0.05
  cfg.model.conv_impl = "xla"  # compiles faster; the lowerings are checked equal in test_conv
  return cfg


def _batch(seed=0, pos=4, neg=4):
  rng = np.random.default_rng(seed)
  return {"pos": jnp.asarray(rng.integers(0, 256, (pos, 2, SIZE, SIZE, 3), dtype=np.uint8)),
          "neg": jnp.asarray(rng.integers(0, 256, (neg, 2, SIZE, SIZE, 3), dtype=np.uint8))}


class Setup:

  def __init__(self, method, dtype=jnp.float32):
    self.cfg = _cfg(method)
    self.method = pretrain.METHODS[method]
    self.model = models.from_config(self.cfg).clone(dtype=dtype)
    self.tx = pretrain.make_optimizer(self.cfg, self.method, steps_per_epoch=10)
    self.step = jax.jit(functools.partial(pretrain.train_step, model=self.model, tx=self.tx, method=self.method,
                                          mean=MEAN, std=STD, temperature=0.07))

  def state(self, seed=0):
    return pretrain.create_train_state(self.model, self.tx, jax.random.key(seed), SIZE)


@pytest.fixture(scope="module")
def slam():
  return Setup("slam_ags")


def _tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_step_is_deterministic_for_a_seed(slam):
  runs = []
  for _ in range(2):
    state = slam.state(0)
    for i in range(2):
      state, metrics = slam.step(state, _batch(i))
    runs.append(state)
  assert _tree_equal(runs[0].params, runs[1].params)
  assert _tree_equal(runs[0].batch_stats, runs[1].batch_stats)
  assert int(runs[0].step) == 2 and bool(metrics["finite"])
  other = slam.state(1)
  assert not _tree_equal(other.params, runs[0].params)


def test_the_donated_step_compiles_once(slam):
  """Steps after the first reuse the compiled step: the returned state has the same types,
  shapes and weak-type flags as the one passed in (what `pretrain.run` relies on)."""
  step = jax.jit(functools.partial(pretrain.train_step, model=slam.model, tx=slam.tx, method=slam.method,
                                   mean=MEAN, std=STD, temperature=0.07), donate_argnums=0)
  state = slam.state(0)
  avals = lambda tree: [(x.shape, x.dtype, x.weak_type) for x in jax.tree_util.tree_leaves(  # noqa: E731
      jax.tree_util.tree_map(jax.typeof, tree))]
  out_state, _ = jax.eval_shape(step, state, _batch(0))
  assert avals(out_state) == avals(state)  # what the single compile rests on
  for i in range(3):
    state, _ = step(state, _batch(i))
  assert step._cache_size() == 1


def _reference_view_embeddings(model, params, stats, images):
  """The reference's separate forward pass per view batch (views=1 each)."""
  outs = []
  for v in range(images.shape[1]):
    x = models.normalize(images[:, v], MEAN, STD, model.dtype)
    out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    stats = upd["batch_stats"]
    outs.append(out["head"])
  return outs, stats


@pytest.fixture(scope="module")
def f64():
  """Float64 versions of the step and of the reference losses (any mismatch is real)."""
  with jax.enable_x64(True):
    setup = Setup("slam_ags", dtype=jnp.float64)
    to64 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
    state = setup.state(0)
    params = to64(state.params)
    state = state.replace(params=params, batch_stats=to64(state.batch_stats), opt_state=setup.tx.init(params))
    batch = _batch(3)
    model, stats0 = setup.model, state.batch_stats

    def ntxent(params):
      (z1, z2), _ = _reference_view_embeddings(model, params, stats0, batch["pos"])
      return losses.nt_xent(z1, z2, 0.07)

    def similarity(params):
      zs, _ = _reference_view_embeddings(model, params, stats0, batch["neg"])
      return losses.similarity_loss(jnp.stack(zs, axis=1), 0.07)

    refs = [jax.jit(jax.value_and_grad(fn))(params) for fn in (ntxent, similarity)]
  # Yielded outside the context: x64 must not stay on for the module's other tests (the
  # tests that use this fixture enter it themselves).
  return setup, state, batch, refs


def test_per_task_gradients_equal_grad_of_each_loss_alone(f64):
  setup, state, batch, refs = f64
  with jax.enable_x64(True):
    task_losses, grads, stats = jax.jit(functools.partial(
        pretrain.task_gradients, model=setup.model, method=setup.method, mean=MEAN, std=STD, temperature=0.07))(
            state.params, state.batch_stats, batch)
    for (ref_loss, ref_grad), loss, grad in zip(refs, task_losses, grads):
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
      for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-9 * float(np.max(np.abs(r)) + 1e-30))
    # Running statistics: positive views, then negative views, as four sequential passes.
    _, s = _reference_view_embeddings(setup.model, state.params, state.batch_stats, batch["pos"])
    _, s = _reference_view_embeddings(setup.model, state.params, s, batch["neg"])
    for a, r in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(s)):
      np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def _first_sgd_update(state, combined, cfg):
  """p' = p - lr * (combined + wd * p): the first SGD step (momentum buffer starts at zero)."""
  lr, wd = cfg.pretrain.lr, cfg.pretrain.weight_decay
  return jax.tree_util.tree_map(lambda p, c: np.asarray(p) - lr * (np.asarray(c) + wd * np.asarray(p)),
                                state.params, combined)


def _assert_update_close(before, got, expected):
  """The update p' - p agrees to float64 precision (up to the float32 lr schedule value)."""
  for p, a, e in zip(*(jax.tree_util.tree_leaves(t) for t in (before, got, expected))):
    delta, want = np.asarray(a) - np.asarray(p), np.asarray(e) - np.asarray(p)
    np.testing.assert_allclose(delta, want, rtol=1e-7, atol=1e-9 * float(np.max(np.abs(want))))


def test_ags_step_applies_the_surgery_to_the_task_gradients(f64):
  setup, state, batch, refs = f64
  with jax.enable_x64(True):
    stacked = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *(g for _, g in refs))
    ags = surgery.adaptive_gradient_surgery(num_tasks=2)
    combined, _ = ags.update(stacked, ags.init(state.params), state.params)
    new, metrics = setup.step(state, batch)
    _assert_update_close(state.params, new.params, _first_sgd_update(state, combined, setup.cfg))
    np.testing.assert_allclose(metrics["surgery/norm_out"], metrics["surgery/norm_sum"], rtol=1e-6)
    assert -1.0 <= float(metrics["surgery/cosine"]) <= 1.0


def test_sum_tasks_update_is_the_gradient_of_the_summed_loss(f64):
  _, state, batch, refs = f64
  with jax.enable_x64(True):
    setup = Setup("weaksupcon", dtype=jnp.float64)
    new, _ = setup.step(state.replace(opt_state=setup.tx.init(state.params)), batch)
    summed = jax.tree_util.tree_map(lambda a, b: a + b, refs[0][1], refs[1][1])  # grad(L1 + L2)
    _assert_update_close(state.params, new.params, _first_sgd_update(state, summed, setup.cfg))


def test_non_finite_step_is_skipped_and_counted(slam):
  state = slam.state(0)
  leaf_path = ("head_fc2", "bias")
  bad_params = jax.tree_util.tree_map(lambda x: x, state.params)
  bad_params = {**bad_params, leaf_path[0]: {**bad_params[leaf_path[0]],
                                             leaf_path[1]: bad_params[leaf_path[0]][leaf_path[1]].at[0].set(jnp.nan)}}
  bad = state.replace(params=bad_params)
  after, metrics = slam.step(bad, _batch(0))
  assert not bool(metrics["finite"])
  assert _tree_equal(after.params, bad.params)
  floats = lambda t: [x for x in jax.tree_util.tree_leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
  ints = lambda t: [x for x in jax.tree_util.tree_leaves(t) if not jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
  assert _tree_equal(floats(after.opt_state), floats(bad.opt_state))  # momentum untouched
  # ... but the schedule's count moves on with the data (no shift of the per-epoch schedule)
  counts = [int(x) for x in jax.tree_util.tree_leaves(after.opt_state) if x.dtype == jnp.int32 and x.ndim == 0]
  assert counts and all(c == 1 for c in counts)
  assert not _tree_equal(ints(after.opt_state), ints(bad.opt_state))
  assert _tree_equal(after.batch_stats, bad.batch_stats)
  assert (int(after.bad_streak), int(after.bad_total), int(after.step)) == (1, 1, 1)
  after2, _ = slam.step(after, _batch(1))
  assert int(after2.bad_streak) == 2
  good, metrics = slam.step(after2.replace(params=state.params), _batch(2))
  assert bool(metrics["finite"]) and (int(good.bad_streak), int(good.bad_total)) == (0, 2)


@pytest.mark.parametrize("method", ["simclr", "weakly"])
def test_every_method_trains(method):
  setup = Setup(method)
  state = setup.state(0)
  new, metrics = setup.step(state, _batch(0))
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  assert not _tree_equal(new.params, state.params)
  names = {"simclr": ["loss/ntxent_all"], "weakly": ["loss/ce"]}
  assert all(k in metrics for k in names[method])
  if method == "weakly":
    assert "classifier" in state.params


def test_lr_schedule_warmup_then_cosine_per_epoch():
  sched = pretrain.lr_schedule(1.0, epochs=4, warmup_epochs=2, steps_per_epoch=3)
  got = [float(sched(s)) for s in range(12)]
  expected = [0.5] * 3 + [1.0] * 3 + [1.0] * 3 + [0.5] * 3  # epochs 0,1 warm-up; 2,3 cosine over 2 epochs
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert float(pretrain.lr_schedule(1.0, 2, 0, 5)(9)) == pytest.approx(0.5)


def test_checkpoint_restores_the_same_state(slam, tmp_path):
  state, _ = slam.step(slam.state(0), _batch(0))
  mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
  checkpoints.save(mngr, 1, state, None, force=True)
  mngr.wait_until_finished()
  fresh = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
  assert fresh.latest_step() == 1
  restored = checkpoints.restore(fresh, 1, slam.state(7), None)
  assert _tree_equal(restored, state)
  assert pretrain.param_l2(restored.params) == pretrain.param_l2(state.params)


def test_collapse_monitor_statistics():
  rng = np.random.default_rng(0)
  spread = rng.standard_normal((64, 16))
  assert pretrain.effective_rank(spread) > 12
  assert pretrain.embedding_spread(spread) > 0.8
  collapsed = np.outer(np.ones(64), rng.standard_normal(16)) + 1e-6 * rng.standard_normal((64, 16))
  assert pretrain.effective_rank(collapsed) < 1.1
  assert pretrain.embedding_spread(collapsed) < 1e-3


def test_collapse_verdict_and_chance_level():
  chance = pretrain.ntxent_chance(32)
  assert chance == pytest.approx(np.log(63))
  z = jnp.ones((32, 8))  # every embedding identical: NT-Xent sits exactly at its chance level
  assert float(losses.nt_xent(z, z, 0.07)) == pytest.approx(chance, rel=1e-6)
  flat = pretrain.collapse_verdict(0.995 * chance, chance, head_rank=30.0, pooled_rank=40.0)
  assert flat["collapsed"] and "NT-Xent" in flat["reasons"][0] and len(flat["reasons"]) == 1
  low_rank = pretrain.collapse_verdict(0.5 * chance, chance, head_rank=3.0)
  assert low_rank["collapsed"] and "effective rank" in low_rank["reasons"][0]
  healthy = pretrain.collapse_verdict(0.7 * chance, chance, head_rank=25.0)
  assert not healthy["collapsed"] and healthy["ntxent_over_chance"] == pytest.approx(0.7)
  assert not pretrain.collapse_verdict(None, None, head_rank=None)["collapsed"]


def _options_cfg(cfg, **kw):
  for key, value in kw.items():
    group, name = key.split("__")
    cfg[group][name] = value
  return cfg


def test_similarity_temperature_scales_only_the_similarity_loss(slam):
  state = slam.state(0)
  batch = _batch(4)
  run = lambda task, t: jax.jit(functools.partial(  # noqa: E731  (forward passes only)
      pretrain.task_loss, task, slam.model, mean=MEAN, std=STD, temperature=0.07,
      sim_temperature=t))(state.params, state.batch_stats, batch)[0]
  base, weak = run("similarity", None), run("similarity", 0.7)
  assert float(weak) == pytest.approx(0.1 * float(base), rel=1e-5)  # (1 - mean cos) / t
  cfg = config_lib.get_base_config()
  assert pretrain.similarity_temperature(cfg) == cfg.pretrain.temperature  # -1: the authors' shared one
  cfg.pretrain.similarity_temperature = 1.0
  assert pretrain.similarity_temperature(cfg) == 1.0


def test_per_task_heads_with_shared_scope_surgery():
  """Per-task heads: each head gets only its task's gradient; scope=shared runs AGS on the
  encoder alone and passes the heads' gradients through (checked against a manual update)."""
  cfg = _options_cfg(_cfg("slam_ags"), model__task_heads="per_task", pretrain__surgery_scope="shared")
  method = pretrain.METHODS["slam_ags"]
  model = models.from_config(cfg)
  tx = pretrain.make_optimizer(cfg, method, steps_per_epoch=10)
  state = pretrain.create_train_state(model, tx, jax.random.key(0), SIZE)
  assert {"head_fc1", "sim_head_fc1", "sim_head_fc2", "encoder"} <= set(state.params)
  batch = _batch(5)
  kw = dict(model=model, method=method, mean=MEAN, std=STD, temperature=0.07)

  @jax.jit
  def grads_and_step(state, batch):  # one compile for both (XLA shares the common passes)
    _, grads, _ = pretrain.task_gradients(state.params, state.batch_stats, batch, **kw)
    return grads, pretrain.train_step(state, batch, tx=tx, **kw)

  (g_nt, g_sim), (new, metrics) = grads_and_step(state, batch)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(g_sim["head_fc2"]))
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(g_nt["sim_head_fc2"]))
  assert bool(metrics["finite"]) and float(metrics["grad_norm/ntxent"]) > 0
  enc = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g_nt["encoder"], g_sim["encoder"])
  ags = surgery.adaptive_gradient_surgery(num_tasks=2)
  combined_enc, _ = ags.update(enc, ags.init(state.params["encoder"]))
  combined = {k: (combined_enc if k == "encoder" else jax.tree_util.tree_map(jnp.add, g_nt[k], g_sim[k]))
              for k in state.params}
  expected = _first_sgd_update(state, combined, cfg)
  for p, a, e in zip(*(jax.tree_util.tree_leaves(t) for t in (state.params, new.params, expected))):
    delta, want = np.asarray(a) - np.asarray(p), np.asarray(e) - np.asarray(p)
    np.testing.assert_allclose(delta, want, rtol=2e-4, atol=1e-6 * float(np.max(np.abs(want)) + 1e-12))


def _cell_batch(seed=0, pos=4, neg=4, step=0, size=SIZE + 4):
  rng = np.random.default_rng(seed)
  index = np.stack([np.full(pos + neg, step, np.int32), np.arange(pos + neg, dtype=np.int32)], axis=1)
  return {"pos": rng.integers(0, 256, (pos, size, size, 3), dtype=np.uint8),
          "neg": rng.integers(0, 256, (neg, size, size, 3), dtype=np.uint8),
          "pos_index": index[:pos], "neg_index": index[pos:]}


def test_on_device_augmentation_trains_and_is_deterministic(slam):
  """augment.on_device: the views are cut inside the jitted step; same seed, step and rows, same views."""
  spec = device_augment.spec_from_config(slam.cfg.augment)
  aug = dict(seed=0, crop=SIZE, augment_spec=spec, neg_center_view=True)
  step = jax.jit(functools.partial(pretrain.augmented_train_step, **aug, model=slam.model, tx=slam.tx,
                                   method=slam.method, mean=MEAN, std=STD, temperature=0.07))
  views = jax.jit(functools.partial(device_augment.augment_batch, seed=0, crop=SIZE, spec=spec, neg_center_view=True))
  batch = _cell_batch(step=3)
  runs = []
  for _ in range(2):
    state0 = slam.state(0)
    state, metrics = step(state0, batch)
    runs.append((state, jax.device_get(views(batch))))
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  assert not _tree_equal(state.params, slam.state(0).params)  # the parameters moved
  assert _tree_equal(runs[0][0].params, runs[1][0].params)
  assert _tree_equal(runs[0][1], runs[1][1])
  # It is train_step on the device's views, and a resumed run (same step) cuts the same views.
  want, _ = slam.step(slam.state(0), views(batch))
  assert _tree_equal(want.params, state.params)
  assert not _tree_equal(jax.device_get(views(_cell_batch(step=4))), runs[0][1])


def test_bfloat16_compute_keeps_parameters_statistics_losses_and_surgery_float32(slam):
  """model.dtype=bfloat16 is the encoder's compute only: the state, the losses and the surgery stay float32.

  Tolerances: on this tiny net (width 4, 16 px, 4 patches, so BatchNorm over 4 values on
  1x1 maps amplifies rounding) the bf16 pooled features are ~7 % from float32's and the
  first losses 0.5-5 % (measured); a real bf16 check is launch/bf16_check.py.
  """
  bf16 = Setup("slam_ags", dtype=jnp.bfloat16)
  state = bf16.state(0)
  # Only the gradients' dtypes are checked: traced (jax.eval_shape), not run op by op.
  grads = jax.eval_shape(functools.partial(pretrain.task_gradients, model=bf16.model, method=bf16.method,
                                           mean=MEAN, std=STD, temperature=0.07),
                         state.params, state.batch_stats, _batch(0))
  new, metrics = bf16.step(state, _batch(0))
  ref, ref_metrics = slam.step(slam.state(0), _batch(0))
  floats = lambda tree: [x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
  for tree in (new.params, new.batch_stats, new.opt_state, grads):
    assert set(floats(tree)) == {jnp.dtype(jnp.float32)}
  assert all(v.dtype in (jnp.float32, jnp.bool_) for v in metrics.values())
  assert bool(metrics["finite"])
  assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=5e-2)
  for k in ("loss/ntxent", "loss/similarity"):
    assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), rel=0.1), k
