"""PyTorch reference of one SLAM-AGS pretraining step, for side-by-side timing only.

Run (needs a PyTorch CPU build; not a dependency of slamags-jax):
  python launch/bench_torch_reference.py --pos 32 --neg 32 --size 64 --steps 5
Prints as its last line one JSON object with `images_per_second` (patches/s),
`step_ms` (the median step; `step_ms_mean`, `step_ms_min` beside it) and `loss`,
comparable with `python -m slamags_jax.bench`.

What it runs is the algorithm as the authors' implementation runs it (written here from
the description in the reference notes, not copied): ResNet18 (torchvision topology and
init, written out because torchvision has no CPU wheel here) with a 512-512-512
projection head; four separate forward passes (positive view 1, positive view 2,
negative view 1, negative view 2); NT-Xent on the positive views and the pull-only
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
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18Head(nn.Module):

  def __init__(self, width=64, head_dim=512):
    super().__init__()
    w = width
    self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(w)
    layers, cin = [], w
    for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
      stride = 1 if i == 0 else 2
      layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
      cin = cout
    self.layers = nn.Sequential(*layers)
    self.head = nn.Sequential(nn.Linear(cin, head_dim), nn.ReLU(), nn.Linear(head_dim, head_dim))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    x = self.layers(x)
    return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def nt_xent(z1, z2, t=0.07):
  z = F.normalize(torch.cat([z1, z2]), dim=1)
  n = z1.shape[0]
  sim = z @ z.T / t
  sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
  target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
  return F.cross_entropy(sim, target)


def similarity(z1, z2, t=0.07):
  z = F.normalize(torch.cat([z1, z2]), dim=1)
  m = z.shape[0]
  cos = z @ z.T
  mean_other = (cos.sum(1) - cos.diagonal()) / (m - 1)
  return ((1.0 - mean_other) / t).mean()


def ags(g1, g2, eps=1e-10):
  gs = [g1.clone(), g2.clone()]
  orig = [g1, g2]
  for i in range(2):
    j = 1 - i
    dot = gs[i] @ orig[j]
    if dot < 0:
      gs[i] -= dot / (orig[j] @ orig[j] + eps) * orig[j]
  g = gs[0] + gs[1]
  norm = g.norm()
  if norm > 0:
    g = g * (g1 + g2).norm() / (norm + eps)
  return g


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--pos", type=int, default=32)
  p.add_argument("--neg", type=int, default=32)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  torch.manual_seed(a.seed)
  model = ResNet18Head(a.width)
  params = [q for q in model.parameters()]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(4, max(a.pos, a.neg), 3, a.size, a.size)
  pos1, pos2, neg1, neg2 = x[0, :a.pos], x[1, :a.pos], x[2, :a.neg], x[3, :a.neg]

  def step():
    opt.zero_grad(set_to_none=True)
    zp1, zp2 = model(pos1), model(pos2)
    zn1, zn2 = model(neg1), model(neg2)
    l_sim = similarity(zn1, zn2)
    l_sim.backward()
    g_sim = torch.cat([q.grad.flatten() for q in params])
    opt.zero_grad(set_to_none=True)
    l_nt = nt_xent(zp1, zp2)
    l_nt.backward()
    g_nt = torch.cat([q.grad.flatten() for q in params])
    g = ags(g_sim, g_nt)
    offset = 0
    for q in params:
      q.grad = g[offset:offset + q.numel()].view_as(q).clone()
      offset += q.numel()
    opt.step()
    return float((l_sim + l_nt).detach())

  loss = step()  # warm-up
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)  # the median step, as slamags_jax.bench reports
  print(json.dumps({"framework": "torch " + torch.__version__, "threads": torch.get_num_threads(),
                    "pos": a.pos, "neg": a.neg, "size": a.size, "width": a.width,
                    "step_ms": round(dt * 1e3, 1), "step_ms_mean": round(statistics.mean(times) * 1e3, 1),
                    "step_ms_min": round(min(times) * 1e3, 1),
                    "images_per_second": round((a.pos + a.neg) / dt, 2), "loss": loss}))


if __name__ == "__main__":
  main()
