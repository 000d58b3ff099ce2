"""The config schema: defaults validate, bad values are named, the config table in docs/configs.md is current."""

import os

import pytest

from slamags_jax import config
from slamags_jax.runtime.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_validate_and_every_field_is_documented():
  config.validate(config.get_base_config())
  assert all(f.doc.strip() for f in config.FIELDS)
  assert len({f.key for f in config.FIELDS}) == len(config.FIELDS)


@pytest.mark.parametrize("key,value,words", [
    ("bags.witness_rate", 0.0, "must be > 0"),
    ("bags.witness_rate", 1.5, "must be <= 1"),
    ("pretrain.method", "magic", "must be one of"),
    ("model.depth", 19, "must be one of"),
    ("stages", "bags,train", "unknown stage"),
    ("data.crop_size", 64, "data.crop_size"),
    ("bags.n_train", 7, "even"),
])
def test_bad_values_name_the_key(key, value, words):
  cfg = config.get_base_config()
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError, match=words) as e:
    config.validate(cfg)
  assert key.split(".")[-1] in str(e.value) or "n_train" in str(e.value)


def test_unknown_key_is_rejected():
  cfg = config.get_base_config()
  cfg.bags.witnes_rate = 0.1
  with pytest.raises(UserError, match="unknown config key 'bags.witnes_rate'"):
    config.validate(cfg)


def test_docs_config_table_is_generated_from_the_schema():
  with open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8") as f:
    readme = f.read()
  begin, end = "<!-- BEGIN CONFIG TABLE -->\n", "<!-- END CONFIG TABLE -->"
  table = readme[readme.index(begin) + len(begin):readme.index(end)]
  assert table == config.markdown_table(), \
      "docs/configs.md config table is stale: regenerate it with python -m slamags_jax.config"


def test_hash_neutral_keys_are_inactive_only_at_their_neutral_value():
  cfg = config.get_base_config()
  for key, neutral in config.HASH_NEUTRAL_DEFAULTS.items():
    assert config.FIELDS_BY_KEY[key].default == neutral  # the default reproduces the recorded results
    assert key in config.inactive_keys(cfg)
  cfg.augment.on_device = True
  assert "augment.on_device" not in config.inactive_keys(cfg)
