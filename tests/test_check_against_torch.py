"""Against PyTorch: three pretraining steps equal to the authors' algorithm (float64), float32 within PyTorch's own
spread, exported weights equal in torchvision.

Runs only where torch is importable (it is no dependency of slamags-jax; install a CPU
build beside it, e.g. `pip install -e ".[torch-check]"`); skipped otherwise.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the equivalence check with the authors' PyTorch algorithm needs it "
    "(a CPU build beside slamags-jax; not a dependency)")

from test_export import fake_run  # noqa: E402  (after the skip: test_export needs no torch, but this file does)

from tools.torch_parity import check  # noqa: E402
from tools.torch_parity import reference as torch_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["slam_ags", "weaksupcon", "simclr"])
def test_float64_three_steps_are_the_same_computation_as_the_authors_pytorch_step(method):
  """The proof: float64 on both sides, losses to 1e-12, parameters and BN statistics to 1e-12, updates to 1e-9."""
  r = check.compare_method(method, steps=3, float64=True, log=lambda *a: None)
  summary = [{k: s[k] for k in ("step", "loss", "param", "stat", "update", "update_worst_tensor")} for s in r["steps"]]
  assert r["ok"], summary
  assert len(r["steps"]) == 3
  if method == "slam_ags":  # the surgery's projection itself was compared, not only a plain sum
    assert any(s["projected"] for s in r["steps"]), [s["cosine"] for s in r["steps"]]


def test_float32_differs_from_pytorch_no_more_than_pytorch_from_itself():
  """Information: simclr in float32 (the method the issue saw miss fixed tolerances on an Intel Xeon), each
  step's error within SPREAD_K x PyTorch's own spread under 1e-7 weight perturbations, measured in this run."""
  r = check.compare_method("simclr", steps=3, float64=False, log=lambda *a: None)
  summary = [{"step": s["step"], "err": {q: s[q] for q in check.QUANTITIES}, "spread": s["spread"], "ratio": s["ratio"]}
             for s in r["steps"]]
  assert r["ok"], summary
  assert all(s["spread"]["param"] > 0 for s in r["steps"]), summary  # the perturbed runs did move apart


def test_float32_judgement_is_k_times_the_spread_with_a_floor():
  """judge_float32: passes at K x spread, fails above it; a zero spread falls back to the floor."""
  k, floors = check.SPREAD_K, check.FLOORS
  spread = {q: 1e-5 for q in check.QUANTITIES}
  assert check.judge_float32({q: k * 1e-5 for q in check.QUANTITIES}, spread)["ok"]
  for q in check.QUANTITIES:
    err = {p: 0.0 for p in check.QUANTITIES} | {q: 1.01 * k * 1e-5}
    assert not check.judge_float32(err, spread)["ok"], q
  zero = {q: 0.0 for q in check.QUANTITIES}
  assert check.judge_float32(dict(floors), zero)["ok"]
  assert not check.judge_float32({q: 1.01 * k * floors[q] for q in check.QUANTITIES}, zero)["ok"]


def _cells(n: int, size: int) -> np.ndarray:
  from PIL import Image
  paths = sorted(glob.glob(os.path.join(ROOT, "sample_data", "pbc", "*", "*.jpg")))[::7][:n]
  assert len(paths) == n
  return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


def test_export_loads_into_torchvision_with_the_same_embeddings(tmp_path):
  """Export -> torchvision resnet18 (strict=False: only fc missing) -> pooled features equal to Flax's, 16 cells."""
  import jax
  from safetensors.torch import load_file

  from slamags_jax import config as config_lib
  from slamags_jax import export, models
  run = str(tmp_path / "run")
  v = fake_run(run, width=64, with_mil=False)
  out = str(tmp_path / "enc.safetensors")
  export.export(run, "torchvision", out)
  cells = _cells(16, 32)
  mean, std = config_lib.get_base_config().data.mean, config_lib.get_base_config().data.std
  model = models.SlamModel(depth=18, width=64, head_dim=16)
  pooled = jax.jit(lambda var, x: model.apply(var, models.normalize(x, mean, std), train=False)["pooled"])
  flax_pooled = np.asarray(pooled(v, cells))

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
