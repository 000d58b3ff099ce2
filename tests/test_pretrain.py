"""Pretraining step: determinism, skips, methods, checkpoints, augmentation, bf16 (oracles: test_pretrain_oracles)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax import config as config_lib
from slamags_jax import losses, models, pretrain
from slamags_jax.data import device_augment
from slamags_jax.runtime import checkpoints

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
