"""``pretrain.aggregator``: defaults leave every method and settings hash unchanged; a two-task
method trains with a non-default aggregator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax import config as config_lib
from slamags_jax import models, pretrain, surgery

SIZE = 16


def _settings(cfg):
  inactive = config_lib.inactive_keys(cfg)
  return {k: v for k, v in config_lib.flatten(cfg).items() if k not in inactive}


@pytest.mark.parametrize("method", [m for m in config_lib.METHODS])
def test_default_aggregator_keeps_settings_and_combine_of_every_method(method):
  cfg = config_lib.get_base_config()
  cfg.pretrain.method = method
  assert cfg.pretrain.aggregator == "method"
  settings = _settings(cfg)
  assert "pretrain.aggregator" not in settings  # the hash is the one recorded before the key
  del cfg.pretrain["aggregator"]  # the config as it was before the key existed
  assert _settings(cfg) == settings
  # the default builds the method's own combine (same transform, same state structure)
  m = pretrain.METHODS[method]
  default = pretrain.combine_transform(m, 0, "method")
  legacy = pretrain.combine_transform(m, 0)
  params = {"w": jnp.zeros(3)}
  assert (jax.tree_util.tree_structure(default.init(params))
          == jax.tree_util.tree_structure(legacy.init(params)))


def test_non_default_aggregator_changes_the_settings_and_needs_two_tasks():
  cfg = config_lib.get_base_config()
  cfg.pretrain.aggregator = "upgrad"
  assert _settings(cfg)["pretrain.aggregator"] == "upgrad"
  config_lib.validate(cfg)
  cfg.pretrain.method = "simclr"
  with pytest.raises(config_lib.UserError, match="one task"):
    config_lib.validate(cfg)
  assert set(config_lib.AGGREGATORS) - {"method"} == set(pretrain.AGGREGATORS)


def test_two_task_method_trains_a_step_with_a_non_default_aggregator():
  cfg = config_lib.get_base_config()
  cfg.pretrain.method = "slam_ags"
  cfg.pretrain.aggregator = "upgrad"
  cfg.model.width = 4
  cfg.model.head_dim = 16
  cfg.model.conv_impl = "xla"
  config_lib.validate(cfg)
  method = pretrain.METHODS["slam_ags"]
  model = models.from_config(cfg)
  tx = pretrain.make_optimizer(cfg, method, steps_per_epoch=10)
  step = jax.jit(functools.partial(pretrain.train_step, model=model, tx=tx, method=method,
                                   mean=(0.6, 0.55, 0.74), std=(0.2, 0.24, 0.11), temperature=0.07))
  state = pretrain.create_train_state(model, tx, jax.random.key(0), SIZE)
  assert isinstance(surgery.all_diagnostics(state.opt_state), list)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, 256, (4, 2, SIZE, SIZE, 3), dtype=np.uint8))
           for k in ("pos", "neg")}
  new, metrics = step(state, batch)
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  found = jax.tree_util.tree_leaves(new.opt_state,
                                    is_leaf=lambda x: isinstance(x, surgery.AggregatorState))
  assert any(isinstance(x, surgery.AggregatorState) for x in found)  # UPGrad ran, not AGS
  assert float(metrics["surgery/norm_out"]) > 0
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)))
