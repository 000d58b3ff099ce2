"""The pretraining step against float64 oracles: per-task gradients, the AGS and summed updates, per-task heads.

Split from test_pretrain.py (same helpers, imported from it) so that the two halves of
its compile time run on two xdist workers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrain import MEAN, SIZE, STD, Setup, _batch, _cfg

from slamags_jax import losses, models, pretrain, surgery

# Float64 ResNet programs: the slowest compiles of the suite, so they run in the full suite
# (`pytest`) and not in the fast loop (`pytest -m "not e2e and not slow"`).
pytestmark = pytest.mark.slow


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


def _options_cfg(cfg, **kw):
  for key, value in kw.items():
    group, name = key.split("__")
    cfg[group][name] = value
  return cfg


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
