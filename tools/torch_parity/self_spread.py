"""How far the authors' PyTorch step drifts from itself: the same steps run again from
starting weights perturbed by 1e-7 relative (float32 rounding size).

Importable: `check_against_torch.py` judges its float32 comparison against this spread,
measured in the same run on the same machine from the same exported weights, batch and
learning rates (`perturbed`, `trajectory`). Runnable on its own (torch's random init,
the check's batch and sizes):

  python -m tools.torch_parity.self_spread slam_ags,simclr [--lr 1e-4]

What it shows: how much any float32-level difference (such as JAX vs PyTorch rounding)
grows within a few steps of this problem, with PyTorch alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import numpy as np
import torch

REL = 1e-7  # float32 rounding is 6e-8 relative


def perturbed(net: torch.nn.Module, seed: int, rel: float = REL) -> torch.nn.Module:
  """A copy of `net` whose parameters are each multiplied by (1 + rel * N(0, 1)), elementwise.

  The factor is applied in float64 and rounded once to the parameter's dtype (in float32,
  1 + 1e-7 * N(0, 1) itself would round to 1 for most draws). BatchNorm statistics are
  not perturbed.
  """
  out = copy.deepcopy(net)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for q in out.parameters():
      noise = torch.randn(q.shape, generator=gen, dtype=torch.float64)
      q.copy_((q.double() * (1.0 + rel * noise)).to(q.dtype))
  return out


def state(net: torch.nn.Module) -> dict[str, np.ndarray]:
  """Parameters and BatchNorm statistics as numpy copies (no `num_batches_tracked`)."""
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def trajectory(net: torch.nn.Module, method: str, pos, neg, *, steps: int, lr_at: Callable[[int], float],
               momentum: float, weight_decay: float, temperature: float) -> list[tuple[dict, dict]]:
  """`steps` authors' steps of `net` (changed in place); per step (task losses, `state(net)`).

  `pos` / `neg`: (view 1, view 2) float NCHW batches; `lr_at(step)`: the learning rate
  of 0-based step `step`, set on the optimiser before it (the per-epoch schedule).
  """
  from tools.torch_parity import reference as torch_reference

  net.train()
  opt = torch.optim.SGD(net.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay)
  out = []
  for step in range(steps):
    for group in opt.param_groups:
      group["lr"] = lr_at(step)
    losses = torch_reference.authors_step(net, opt, method, pos, neg, temperature)
    out.append((losses, state(net)))
  return out


def main(argv=None) -> int:
  from slamags_jax import config as config_lib
  from slamags_jax import pretrain
  from tools.torch_parity import measure
  from tools.torch_parity import reference as torch_reference

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("methods", help="comma list from slam_ags, weaksupcon, pcgrad, simclr")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--steps", type=int, default=3)
  a = p.parse_args(argv)
  cfg = config_lib.get_base_config()
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
  batch = measure.make_batch(8, 8, 64, 1)
  sched = pretrain.lr_schedule(a.lr, 2, 0, 2)
  def views(x):
    return (torch_reference.to_input(x[:, 0], mean, std), torch_reference.to_input(x[:, 1], mean, std))
  torch.manual_seed(0)
  for method in a.methods.split(","):
    base = torch_reference.SlamNet(18, 8, 32)
    runs = []
    for net in (base, perturbed(base, seed=1)):
      start = state(net)
      runs.append((start, trajectory(net, method, views(batch["pos"]), views(batch["neg"]), steps=a.steps,
                                     lr_at=lambda s: float(sched(s)), momentum=cfg.pretrain.momentum,
                                     weight_decay=cfg.pretrain.weight_decay, temperature=cfg.pretrain.temperature)))
    (start_a, traj_a), (start_b, traj_b) = runs
    for step, ((loss_a, sd_a), (loss_b, sd_b)) in enumerate(zip(traj_a, traj_b)):
      e = measure.step_errors(loss_b, sd_b, start_b, loss_a, sd_a, start_a)
      print(f"{method} step {step + 1}: loss {e['loss']:.2e} param {e['param']:.2e} stat {e['stat']:.2e} "
            f"update {e['update']:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
