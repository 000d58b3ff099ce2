"""PyTorch reference of one SLAM-AGS pretraining step, for side-by-side timing only.

Run (needs PyTorch; not a dependency of slamags-jax):
  python launch/bench_torch_reference.py --pos 32 --neg 32 --size 64 --steps 5
  python launch/bench_torch_reference.py --pos 128 --neg 128 --size 224 --device cuda   # a GPU
Prints as its last line one JSON object with `images_per_second` (patches/s),
`step_ms` (the median step; `step_ms_mean`, `step_ms_min` beside it) and `loss`,
comparable with `python -m slamags_jax.bench`.

What it runs is the algorithm as the authors' implementation runs it, from
`torch_reference.py` (the same code `check_against_torch.py` proves equal to
`slamags_jax.pretrain.train_step`): ResNet18 (torchvision topology and init, written out
because torchvision's wheel needs a CUDA build of torch) with a 512-512-512 projection
head; four separate forward passes (positive view 1, positive view 2, negative view 1,
negative view 2); NT-Xent on the positive views and the pull-only
similarity loss on the negative views, each backpropagated on its own (two backward
passes); the two gradients flattened into vectors, adaptive gradient surgery, and SGD
with momentum 0.9, weight decay 1e-4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tools.torch_parity.reference import SlamNet, authors_step  # shared with tools.torch_parity.check


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--pos", type=int, default=32)
  p.add_argument("--neg", type=int, default=32)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (launch/gpu_check.sh)")
  a = p.parse_args()
  torch.manual_seed(a.seed)
  device = torch.device(a.device)
  model = SlamNet(18, a.width).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(4, max(a.pos, a.neg), 3, a.size, a.size).to(device)
  pos1, pos2, neg1, neg2 = x[0, :a.pos], x[1, :a.pos], x[2, :a.neg], x[3, :a.neg]

  def step():
    losses = authors_step(model, opt, "slam_ags", (pos1, pos2), (neg1, neg2))
    return losses["similarity"] + losses["ntxent"]  # floats: the step has finished on the device

  loss = step()  # warm-up
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)  # the median step, as slamags_jax.bench reports
  print(json.dumps({"framework": "torch " + torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                             if device.type == "cuda" else ""),
                    "pos": a.pos, "neg": a.neg, "size": a.size, "width": a.width,
                    "step_ms": round(dt * 1e3, 1), "step_ms_mean": round(statistics.mean(times) * 1e3, 1),
                    "step_ms_min": round(min(times) * 1e3, 1),
                    "images_per_second": round((a.pos + a.neg) / dt, 2), "loss": loss}))


if __name__ == "__main__":
  main()
