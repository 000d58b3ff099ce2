"""How far the authors' PyTorch step drifts from itself: the same step run twice, the second
copy's starting weights perturbed by 1e-7 relative (float32 rounding size).

  python launch/torch_self_spread.py slam_ags,simclr

Same batch, sizes and errors as check_against_torch.py (8 + 8 real cells, 64 px, width 8,
lr 1e-3, 3 steps); the model is torch's own random init. What it shows: how much any
float32-level difference (such as JAX vs PyTorch rounding) grows within 3 steps here.
"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, torch, copy
import torch_reference as T, check_against_torch as C
from slamags_jax import config as config_lib, pretrain
cfg = config_lib.get_base_config()
mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
batch = C.make_batch(8, 8, 64, 1)
sched = pretrain.lr_schedule(1e-3, 2, 0, 2)
to = lambda a: T.to_input(a, mean, std)
views = lambda a: (to(a[:, 0]), to(a[:, 1]))
torch.manual_seed(0)
for method in sys.argv[1].split(","):
  base = T.SlamNet(18, 8, 32)
  nets = [base, copy.deepcopy(base)]
  with torch.no_grad():  # perturb the copy by ~1e-7 relative (float32 rounding size)
    for q in nets[1].parameters():
      q.mul_(1 + 1e-7 * torch.randn_like(q))
  start = {k: v.clone() for k, v in base.state_dict().items()}
  opts = [torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4) for n in nets]
  for step in range(3):
    losses = []
    for n, o in zip(nets, opts):
      for g in o.param_groups: g["lr"] = float(sched(step))
      losses.append(T.authors_step(n, o, method, views(batch["pos"]), views(batch["neg"])))
    sd = [{k: v.detach().numpy() for k, v in n.state_dict().items() if "num_batches" not in k} for n in nets]
    pk = [k for k, _ in nets[0].named_parameters()]
    sk = [k for k in sd[0] if "running" in k]
    d = [{k: s[k] - start[k].numpy() for k in pk} for s in sd]
    print(method, step + 1, "loss", {k: abs(losses[0][k] - losses[1][k]) for k in losses[0]},
          "param %.2e stat %.2e update %.2e" % (C.global_rel_err(sd[1], sd[0], pk), C.global_rel_err(sd[1], sd[0], sk), C.global_rel_err(d[1], d[0], pk)))
