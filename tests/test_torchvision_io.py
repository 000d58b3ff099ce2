"""Flax <-> torchvision key names and layouts (no torch needed; model shapes from eval_shape)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamags_jax import config as config_lib
from slamags_jax import models, pretrain
from slamags_jax.interop import torchvision as torchvision_io
from slamags_jax.runtime.errors import UserError

RECORDED = os.path.join(os.path.dirname(__file__), "data", "torchvision_resnet18_state_dict.txt")


def random_variables(depth=18, width=8, head_dim=16, num_classes=0, seed=0):
  """SlamModel variables with random values (BN variances > 0), without running init."""
  model = models.SlamModel(depth=depth, width=width, head_dim=head_dim, num_classes=num_classes)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 32, 32, 3)), train=True), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name and len(s.shape) == 4:
      kh, kw, _, cout = s.shape
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / (kh * kw * cout))).astype(np.float32)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def encoder_of(variables):
  return {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}


def test_keys_shapes_dtypes_are_torchvision_resnet18s():
  """Recorded from torchvision 0.28's resnet18().state_dict() (see the file's first line); fc aside."""
  recorded = {}
  with open(RECORDED) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      key, shape, dtype = line.split()
      recorded[key] = (() if shape == "()" else tuple(int(d) for d in shape.split("x")), dtype)
  sd = torchvision_io.encoder_to_torchvision(encoder_of(random_variables(width=64)), num_batches_tracked=7)
  assert set(recorded) - set(sd) == {"fc.weight", "fc.bias"}
  assert set(sd) <= set(recorded)
  for key, value in sd.items():
    assert (value.shape, str(value.dtype)) == recorded[key], key
  assert int(sd["layer3.1.bn2.num_batches_tracked"]) == 7


def test_layouts_oihw_and_linear_out_in():
  v = random_variables(num_classes=2)
  sd = torchvision_io.encoder_to_torchvision(encoder_of(v))
  k = np.asarray(v["params"]["encoder"]["layer2_0"]["downsample_conv"]["kernel"])  # HWIO
  np.testing.assert_array_equal(sd["layer2.0.downsample.0.weight"], np.transpose(k, (3, 2, 0, 1)))
  assert sd["conv1.weight"][5, 2, 1, 4] == v["params"]["encoder"]["conv1"]["kernel"][1, 4, 2, 5]
  np.testing.assert_array_equal(sd["layer4.1.bn2.running_var"], v["batch_stats"]["encoder"]["layer4_1"]["bn2"]["var"])
  np.testing.assert_array_equal(sd["layer1.0.bn1.weight"], v["params"]["encoder"]["layer1_0"]["bn1"]["scale"])
  head = torchvision_io.head_to_torch(v["params"])
  assert sorted(head) == ["0.bias", "0.weight", "2.bias", "2.weight", "3.bias", "3.weight"]
  np.testing.assert_array_equal(head["0.weight"], np.asarray(v["params"]["head_fc1"]["kernel"]).T)
  assert head["3.weight"].shape == (2, 16)


@pytest.mark.parametrize("depth,width", [(18, 8), (34, 4), (50, 4)])
def test_round_trip_is_exact(tmp_path, depth, width):
  v = random_variables(depth=depth, width=width)
  path = str(tmp_path / "enc.safetensors")
  torchvision_io.save(path, torchvision_io.encoder_to_torchvision(encoder_of(v)))
  zeros = jax.tree_util.tree_map(np.zeros_like, v)
  back = torchvision_io.init_encoder(zeros, path)
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), encoder_of(back), encoder_of(v))
  assert all(jax.tree_util.tree_leaves(same))
  np.testing.assert_array_equal(back["params"]["head_fc1"]["kernel"], 0)  # only the encoder is imported


def test_init_state_from_replaces_the_encoder_only(tmp_path):
  v = random_variables()
  path = str(tmp_path / "enc.safetensors")
  sd = torchvision_io.encoder_to_torchvision(encoder_of(v))
  # ImageNet's fc: ignored
  sd["fc.weight"], sd["fc.bias"] = np.ones((1000, 64), np.float32), np.ones((1000,), np.float32)
  torchvision_io.save(path, sd)
  fresh = random_variables(seed=1)
  state = pretrain.TrainState(step=0, params=fresh["params"], batch_stats=fresh["batch_stats"], opt_state=None,
                              bad_streak=0, bad_total=0)
  assert torchvision_io.init_state_from(state, "") is state
  new = torchvision_io.init_state_from(state, path)
  np.testing.assert_array_equal(new.params["encoder"]["layer3_0"]["conv2"]["kernel"],
                                v["params"]["encoder"]["layer3_0"]["conv2"]["kernel"])
  np.testing.assert_array_equal(new.batch_stats["encoder"]["bn1"]["mean"], v["batch_stats"]["encoder"]["bn1"]["mean"])
  np.testing.assert_array_equal(new.params["head_fc2"]["bias"], fresh["params"]["head_fc2"]["bias"])


def test_mismatches_are_errors_naming_the_key(tmp_path):
  like = encoder_of(random_variables(width=8))
  sd = torchvision_io.encoder_to_torchvision(like)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
  with pytest.raises(UserError, match=r"no key 'layer2\.1\.bn1\.running_var'"):
    torchvision_io.encoder_from_torchvision(missing, like)
  wide = torchvision_io.encoder_to_torchvision(encoder_of(random_variables(width=16)))
  wrong_width = r"key '(conv1\.weight|bn1\.\w+)' has shape \(16,( 3, 7, 7)?\), this model needs \(8,"
  with pytest.raises(UserError, match=wrong_width):
    torchvision_io.encoder_from_torchvision(wide, like)
  deeper = torchvision_io.encoder_to_torchvision(encoder_of(random_variables(depth=34, width=8)))
  with pytest.raises(UserError, match=r"no place for, e\.g\. 'layer1\.2\.bn1\.bias'.*model\.depth"):
    torchvision_io.encoder_from_torchvision(deeper, like)  # every ResNet18 key is in a ResNet34: extras must fail
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="not a readable safetensors file"):
    torchvision_io.load(str(tmp_path / "bad.safetensors"))
  with pytest.raises(UserError, match="not found"):
    torchvision_io.load(str(tmp_path / "none.safetensors"))


def test_config_init_from_must_name_a_file(tmp_path):
  cfg = config_lib.get_base_config()
  cfg.model.init_from = str(tmp_path / "missing.safetensors")
  with pytest.raises(UserError, match="'model.init_from' names no file"):
    config_lib.validate(cfg)
  (tmp_path / "missing.safetensors").write_bytes(b"")
  config_lib.validate(cfg)  # contents are checked where the encoder is initialised
