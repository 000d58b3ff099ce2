"""The authors' pretraining step in PyTorch: one implementation for timing and for checking.

Used by `bench_torch_reference.py` (side-by-side timing) and `check_against_torch.py`
(numerical equivalence with `slamags_jax.pretrain.train_step`). Needs PyTorch (a CPU
build is enough); torch is not a dependency of slamags-jax.

Written from the description in the reference notes (not copied from the authors' code):

- `ResNet`: torchvision's ResNet18/34/50 topology, initialisation and module names
  (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layerS.0.downsample.0/1`), without `fc`, so
  its `state_dict()` has torchvision's keys; `width` scales the channels (64 =
  torchvision). `SlamNet` adds the 512-512-512 projection head as
  `nn.Sequential(Linear, ReLU, Linear)` (and the `weakly` method's classifier).
- `authors_step`: one optimisation step as the authors' implementation runs it. For
  `slam_ags`, `pcgrad`, `weaksupcon`: four separate forward passes in train mode
  (positive view 1, positive view 2, negative view 1, negative view 2), the similarity
  loss on the negative views and NT-Xent on the positive views, each backpropagated on
  its own (two backward passes), the two gradients flattened into vectors and combined
  (adaptive gradient surgery with rescale / PCGrad / sum), then `torch.optim.SGD` with
  momentum and coupled weight decay. `simclr` and `weakly`: two forward passes (view 1
  and view 2 of all patches), one loss, one backward pass.
"""

from __future__ import annotations

import sys
import types
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def import_torchvision():
  """torchvision, or None when it is not installed.

  PyPI's torchvision wheel carries C++ ops built against a CUDA build of torch; beside a
  CPU build only the registration of those ops (`torchvision._meta_registrations`)
  fails, while the model builders are plain Python. That module is then skipped, so
  `torchvision.models.resnet18()` (what the load test needs) works; detection ops do not.
  """
  try:
    import torchvision
    return torchvision
  except ImportError:
    return None
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  import torchvision
  return torchvision


STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
SLAM_METHODS = ("slam_ags", "pcgrad", "weaksupcon")


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, 0, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    out = planes * self.expansion
    self.conv1 = nn.Conv2d(cin, planes, 1, 1, 0, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, 1, 0, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, 0, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """torchvision's ResNet without `fc`: images [N, 3, H, W] -> pooled features [N, C]."""

  def __init__(self, depth=18, width=64):
    super().__init__()
    block = Bottleneck if depth >= 50 else BasicBlock
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for stage, n_blocks in enumerate(STAGE_BLOCKS[depth]):
      planes = width * 2**stage
      blocks = []
      for b in range(n_blocks):
        blocks.append(block(cin, planes, 2 if stage > 0 and b == 0 else 1))
        cin = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.features = cin
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for stage in range(4):
      x = getattr(self, f"layer{stage + 1}")(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SlamNet(nn.Module):
  """Encoder + projection head (+ bag-label classifier), outputs as `slamags_jax.models.SlamModel`."""

  def __init__(self, depth=18, width=64, head_dim=512, num_classes=0):
    super().__init__()
    self.encoder = ResNet(depth, width)
    self.head = nn.Sequential(nn.Linear(self.encoder.features, head_dim), nn.ReLU(), nn.Linear(head_dim, head_dim))
    self.classifier = nn.Linear(head_dim, num_classes) if num_classes else None

  def forward(self, x):
    pooled = self.encoder(x)
    out = {"pooled": pooled, "head": self.head(pooled)}
    if self.classifier is not None:
      out["logits"] = self.classifier(out["head"])
    return out

  def load_exported(self, encoder: dict, head: dict) -> None:
    """Loads `slamags_jax.export` output (encoder and head state dicts), strictly."""
    self.encoder.load_state_dict(encoder, strict=True)
    self.head.load_state_dict({k: v for k, v in head.items() if not k.startswith("3.")}, strict=True)
    if self.classifier is not None:
      self.classifier.load_state_dict({"weight": head["3.weight"], "bias": head["3.bias"]}, strict=True)


def to_input(images: np.ndarray, mean: Sequence[float], std: Sequence[float], dtype=torch.float32) -> torch.Tensor:
  """uint8 [N, H, W, 3] -> float NCHW, x / 255 then (x - mean) / std (as `models.normalize`)."""
  x = torch.from_numpy(np.ascontiguousarray(images)).to(dtype) / 255.0
  x = (x - torch.tensor(mean, dtype=dtype)) / torch.tensor(std, dtype=dtype)
  return x.permute(0, 3, 1, 2).contiguous()


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


def surgery(grads, rescale=True, eps=1e-10, orders=None):
  """PCGrad projection of flattened task gradients against the others' originals, sum, and
  (AGS) rescale to the norm of the plain sum. `orders[i]`: the tasks g_i is projected
  against, in order (default: ascending; with two tasks there is one order)."""
  t = len(grads)
  projected = [g.clone() for g in grads]
  for i in range(t):
    for j in (orders[i] if orders is not None else [k for k in range(t) if k != i]):
      dot = projected[i] @ grads[j]
      if dot < 0:
        projected[i] -= dot / (grads[j] @ grads[j] + eps) * grads[j]
  g = sum(projected)
  if rescale:
    norm = g.norm()
    if norm > 0:
      g = g * sum(grads).norm() / (norm + eps)
  return g


def ags(g1, g2, eps=1e-10):
  """Adaptive gradient surgery of two flattened gradients."""
  return surgery([g1, g2], rescale=True, eps=eps)


def _flat_grad(params):
  return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in params])


def _set_flat_grad(params, g):
  offset = 0
  for q in params:
    q.grad = g[offset:offset + q.numel()].view_as(q).clone()
    offset += q.numel()


def authors_step(model, opt, method, pos, neg, temperature=0.07):
  """One step; `pos` / `neg`: (view 1, view 2) float NCHW batches. Returns the task losses.

  Task losses are named as in `slamags_jax.pretrain` (`ntxent`, `similarity`,
  `ntxent_all`, `ce`).
  """
  params = list(model.parameters())
  opt.zero_grad(set_to_none=True)
  if method in SLAM_METHODS:
    zp1, zp2 = model(pos[0])["head"], model(pos[1])["head"]
    zn1, zn2 = model(neg[0])["head"], model(neg[1])["head"]
    l_sim = similarity(zn1, zn2, temperature)
    l_sim.backward()
    g_sim = _flat_grad(params)
    opt.zero_grad(set_to_none=True)
    l_nt = nt_xent(zp1, zp2, temperature)
    l_nt.backward()
    g_nt = _flat_grad(params)
    if method == "weaksupcon":
      g = g_sim + g_nt
    else:
      g = surgery([g_sim, g_nt], rescale=method == "slam_ags")
    _set_flat_grad(params, g)
    opt.step()
    return {"ntxent": float(l_nt.detach()), "similarity": float(l_sim.detach())}
  out1 = model(torch.cat([pos[0], neg[0]]))
  out2 = model(torch.cat([pos[1], neg[1]]))
  if method == "simclr":
    loss, name = nt_xent(out1["head"], out2["head"], temperature), "ntxent_all"
  elif method == "weakly":
    labels = torch.cat([torch.ones(pos[0].shape[0], dtype=torch.long), torch.zeros(neg[0].shape[0], dtype=torch.long)])
    loss, name = F.cross_entropy(torch.cat([out1["logits"], out2["logits"]]), torch.cat([labels, labels])), "ce"
  else:
    raise ValueError(f"no PyTorch reference for method {method!r}")
  loss.backward()
  opt.step()
  return {name: float(loss.detach())}
