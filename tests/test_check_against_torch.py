"""Against PyTorch: one pretraining step equal to the authors' algorithm, exported weights equal in torchvision.

Runs only where torch is importable (it is no dependency of slamags-jax; install a CPU
build beside it, e.g. `pip install -e ".[torch-check]"`); skipped otherwise.
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the equivalence check with the authors' PyTorch algorithm needs it "
    "(a CPU build beside slamags-jax; not a dependency)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import check_against_torch as check  # noqa: E402
import torch_reference  # noqa: E402

from test_export import fake_run  # noqa: E402


@pytest.mark.parametrize("method", ["slam_ags", "weaksupcon", "simclr"])
def test_three_steps_equal_the_authors_pytorch_step(method):
  """Losses to 1e-5, parameters and BN running statistics to 1e-4 relative, over 3 steps (float32)."""
  r = check.compare_method(method, steps=3, pos=8, neg=8, size=64, width=8, lr=1e-4, log=lambda *a: None)
  summary = [{k: s[k] for k in ("step", "loss_err", "param_err", "stat_err", "delta_err", "delta_err_worst_tensor")}
             for s in r["steps"]]
  assert r["ok"], summary
  assert len(r["steps"]) == 3
  if method == "slam_ags":  # the surgery's projection itself was compared, not only a plain sum
    assert any(s["projected"] for s in r["steps"]), [s["cosine"] for s in r["steps"]]


def _cells(n: int, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(ROOT, "sample_data", "pbc", "*", "*.jpg")))[::7][:n]
  assert len(paths) == n
  return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


def test_export_loads_into_torchvision_with_the_same_embeddings(tmp_path):
  """Export -> torchvision resnet18 (strict=False: only fc missing) -> pooled features equal to Flax's, 16 cells."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  from slamags_jax import config as config_lib, export, models  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  v = fake_run(run, width=64, with_mil=False)
  out = str(tmp_path / "enc.safetensors")
  export.export(run, "torchvision", out)
  cells = _cells(16, 32)
  mean, std = config_lib.get_base_config().data.mean, config_lib.get_base_config().data.std
  model = models.SlamModel(depth=18, width=64, head_dim=16)
  flax_pooled = np.asarray(jax.jit(lambda var, x: model.apply(var, models.normalize(x, mean, std), train=False)["pooled"])(
      v, cells))

  state = load_file(out)
  nets = {"torch_reference.ResNet": torch_reference.ResNet(18, 64)}
  nets["torch_reference.ResNet"].load_state_dict(state, strict=True)
  tv = torch_reference.import_torchvision()
  if tv is not None:
    net = tv.models.resnet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.fc = torch.nn.Identity()
    nets["torchvision.models.resnet18"] = net
  x = torch_reference.to_input(cells, mean, std)
  for name, net in nets.items():
    with torch.no_grad():
      pooled = net.eval()(x).numpy()
    assert pooled.shape == (16, 512)
    err = check.rel_err(flax_pooled, pooled)
    assert err <= 1e-4, (name, err)
  if tv is None:
    pytest.skip("torchvision is not installed: compared with torch_reference.ResNet (torchvision's key names) only")
