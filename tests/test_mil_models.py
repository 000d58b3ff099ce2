"""The MIL aggregators on their own (padding through the training code: test_mil.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax import config, mil
from slamags_jax.models import mil as mil_models
from slamags_jax.runtime.errors import UserError


def test_masked_softmax_gives_masked_entries_exactly_zero():
  logits = jnp.array([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, False], [False, False, False]])
  a = np.asarray(mil_models.masked_softmax(logits, mask, axis=-1))
  np.testing.assert_allclose(a[0, :2], np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum(), rtol=1e-6)
  assert a[0, 2] == 0.0 and np.all(a[1] == 0.0)  # an all-masked row: zeros, no NaN


def test_l2_normalize_has_a_finite_gradient_at_zero():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(mil_models.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  g = jax.grad(lambda v: mil_models.l2_normalize(v).sum())(x)
  assert np.isfinite(np.asarray(g)).all()


def test_weight_norm_dense_starts_equal_to_its_direction():
  layer = mil_models.WeightNormDense(3)
  x = jnp.ones((2, 5))
  params = layer.init(jax.random.key(0), x)["params"]
  np.testing.assert_allclose(np.linalg.norm(params["direction"], axis=0), params["gain"], rtol=1e-6)
  np.testing.assert_allclose(layer.apply({"params": params}, x), x @ params["direction"], rtol=1e-5)


@pytest.mark.parametrize("name,branches", [("abmil", 1), ("pamil", 3)])
def test_models_give_logits_and_attention_per_class(name, branches):
  c = config.get_base_config().mil
  c.model, c.hidden_dim, c.attention_dim, c.n_prototypes = name, 8, 4, 2
  model = mil_models.make_model(c, num_classes=3)
  params = mil_models.init_model(model, jax.random.key(1), 6)
  x, mask = jnp.ones((2, 5, 6)), jnp.array([[True] * 5, [True] * 2 + [False] * 3])
  out = model.apply({"params": params}, x, mask)
  assert out["logits"].shape == (2, 3) and out["attention"].shape == (2, 5)
  assert out["attention_branches"].shape == (2, 5, branches)
  np.testing.assert_allclose(np.asarray(out["attention"]).sum(-1), [1.0, 1.0], rtol=1e-5)
  assert mil_models.model_from_meta({**c.to_dict(), "num_classes": 3}).num_classes == 3


def test_unknown_model_is_a_user_error_and_mil_reexports_the_models():
  with pytest.raises(UserError, match="mil.model"):
    mil_models.make_model({"model": "transmil"})
  assert mil.make_model is mil_models.make_model and mil.ABNORMAL == mil_models.ABNORMAL
