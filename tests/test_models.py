"""ResNet encoder: torchvision's topology, parameter count and conventions; BatchNorm per view batch."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax import models


def _shapes(model, size, batch=2):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=True))


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_parameter_count_matches_torchvision_without_fc(depth, expected):
  variables = _shapes(models.SlamModel(depth=depth, width=64), 64)
  assert models.param_count(variables["params"]["encoder"]) == expected
  # Projection head 512 -> 512 -> 512 (ResNet18) with biases.
  head = variables["params"]
  feat = 512 if depth == 18 else 2048
  head_params = {k: v for k, v in head.items() if k.startswith("head")}
  assert models.param_count(head_params) == feat * 512 + 512 + 512 * 512 + 512


def _torch_out(n, k, s, p):
  return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("size", [224, 33, 48])
def test_feature_map_sizes_follow_torch_padding(size):
  model = models.ResNet(depth=18, width=8)
  variables = _shapes(model, size)
  _, inter = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3)), train=False,
                                                  capture_intermediates=True, mutable=["intermediates"]), variables)
  inter = inter["intermediates"]
  n = _torch_out(size, 7, 2, 3)
  assert inter["conv1"]["__call__"][0].shape == (2, n, n, 8)
  n = _torch_out(n, 3, 2, 1)  # max-pool 3x3/2, padding 1
  expected = {"layer1_1": n}
  for stage in (2, 3, 4):
    n = _torch_out(n, 3, 2, 1)
    expected[f"layer{stage}_1"] = n
  for name, side in expected.items():
    shape = inter[name]["__call__"][0].shape
    assert shape[1:3] == (side, side), (name, shape)


def test_init_follows_torchvision():
  model = models.SlamModel(width=64)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=True))()
  params, stats = variables["params"], variables["batch_stats"]
  w = np.asarray(params["encoder"]["layer4_1"]["conv2"]["kernel"])  # 3x3x512x512, fan_out = 9 * 512
  assert abs(w.std() / np.sqrt(2.0 / (9 * 512)) - 1) < 0.02
  assert abs(w.mean()) < 1e-3
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  bn_scales = [v for p, v in flat if "scale" in jax.tree_util.keystr(p)]
  bn_biases = [v for p, v in flat if "bn" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p)]
  assert len(bn_scales) == 20  # stem + 2 per block x 8 + 3 downsample
  assert all(np.all(np.asarray(s) == 1.0) for s in bn_scales)  # no zero-init of the last BN in a block
  assert all(np.all(np.asarray(b) == 0.0) for b in bn_biases)
  assert all(np.all(np.asarray(m) == 0) for m in jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x: x, {k: v for k, v in stats["encoder"]["bn1"].items() if k == "mean"})))
  fc1 = np.asarray(params["head_fc1"]["kernel"])  # torch Linear default: U(-1/sqrt(512), 1/sqrt(512))
  bound = 1 / np.sqrt(512)
  assert fc1.min() >= -bound and fc1.max() <= bound and fc1.max() > 0.95 * bound


def test_batchnorm_pytorch_semantics():
  bn = models.BatchNorm()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3, 3, 4)) * 2 + 1, jnp.float32)
  v = bn.init(jax.random.key(0), x, train=True)
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  n = 6 * 3 * 3
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)  # unbiased
  y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False)
  np.testing.assert_allclose(y_eval, (xn - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var * n / (n - 1) + 1e-5),
                             rtol=1e-5, atol=1e-5)


def test_views_in_one_call_equal_separate_passes():
  """Patch-major [B * V] rows with `views=V` == V reference passes of B rows each."""
  rng = np.random.default_rng(0)
  b, size = 4, 16
  views = jnp.asarray(rng.standard_normal((b, 2, size, size, 3)), jnp.float32)
  one = models.SlamModel(width=4, head_dim=8)
  variables = one.init(jax.random.key(0), views[:, 0], train=True)
  stats = variables["batch_stats"]
  outs = []
  for v in range(2):  # the reference: one pass per view, running stats updated in turn
    out, upd = one.apply({"params": variables["params"], "batch_stats": stats}, views[:, v], train=True,
                         mutable=["batch_stats"])
    stats = upd["batch_stats"]
    outs.append(out["head"])
  fused, upd = one.clone(views=2).apply(variables, views.reshape((b * 2, size, size, 3)), train=True,
                                         mutable=["batch_stats"])
  fused_head = fused["head"].reshape(b, 2, -1)
  for v in range(2):
    np.testing.assert_allclose(fused_head[:, v], outs[v], rtol=1e-4, atol=1e-5)
  for a, r in zip(jax.tree_util.tree_leaves(upd["batch_stats"]), jax.tree_util.tree_leaves(stats)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_device_groups_normalise_each_group_separately():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 2, 2, 3)), jnp.float32)
  x = x.at[4:].multiply(5.0).at[4:].add(3.0)  # the second group has other statistics
  bn = models.BatchNorm(device_groups=2)
  v = bn.init(jax.random.key(0), x, train=True)
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  single = models.BatchNorm()
  for half in (slice(0, 4), slice(4, 8)):
    y_half, _ = single.apply(v, x[half], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y[half], y_half, rtol=1e-5, atol=1e-5)
  xs = np.asarray(x, np.float64).reshape(2, 4 * 2 * 2, 3)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(1).mean(0), rtol=1e-5)


def test_normalize_matches_reference_statistics():
  img = np.full((1, 2, 2, 3), 255, np.uint8)
  out = models.normalize(img, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
  np.testing.assert_allclose(out[0, 0, 0], [2.0, 1.0, 0.5])


@pytest.mark.parametrize("size", [8, 9, 16])
def test_max_pool_matches_flax_values_and_gradients(size):
  rng = np.random.default_rng(size)
  x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  x[0, :4, :4, 0] = 0.0  # ties (as after a ReLU): the gradient must go to the first maximum
  x[1, 2:5, 1:4, 1] = 0.5
  x = jnp.asarray(x)
  ref = lambda x: flax.linen.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  np.testing.assert_array_equal(models.max_pool_3x3_s2_p1(x), ref(x))
  dy = jnp.asarray(rng.standard_normal(ref(x).shape).astype(np.float32))
  got = jax.vjp(models.max_pool_3x3_s2_p1, x)[1](dy)[0]
  want = jax.vjp(ref, x)[1](dy)[0]
  jitted = jax.jit(lambda x, dy: jax.vjp(models.max_pool_3x3_s2_p1, x)[1](dy)[0])(x, dy)
  for g in (got, jitted):
    np.testing.assert_array_equal(g != 0, want != 0)  # the same cells receive gradient
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)  # sums of overlapping windows may reorder


@pytest.mark.parametrize("groups,views", [(1, 1), (1, 2), (2, 2)])
def test_batch_norm_gradient_equals_autodiff_of_the_formula(groups, views):
  """The closed-form BatchNorm gradient equals autodiff of the plain formula (float64)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(groups + views)
    x = jnp.asarray(rng.standard_normal((8, 3, 3, 5)) * 2 + 1)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 5))
    bias = jnp.asarray(rng.standard_normal(5))
    dy = jnp.asarray(rng.standard_normal(x.shape))

    def plain(x, scale, bias):
      xs = x.reshape((groups, 8 // (groups * views), views) + x.shape[1:])
      mean = jnp.mean(xs, axis=(1, 3, 4), keepdims=True)
      var = jnp.mean(jnp.square(xs - mean), axis=(1, 3, 4), keepdims=True)
      return ((xs - mean) / jnp.sqrt(var + 1e-5) * scale + bias).reshape(x.shape)

    def custom(x, scale, bias):
      return models.batch_norm_train(x, scale, bias, groups, views, 1e-5)[0]

    y, vjp = jax.vjp(custom, x, scale, bias)
    y_ref, vjp_ref = jax.vjp(plain, x, scale, bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
      np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
