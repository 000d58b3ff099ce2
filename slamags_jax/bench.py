"""Benchmarks: the pretraining step, embedding extraction and MIL training.

  python -m slamags_jax.bench --pos 32 --neg 32 --size 64 --steps 10 --method slam_ags --seed 0
  python -m slamags_jax.bench --pos 32 --neg 32 --size 64 --steps 10 --surgery-overhead
  python -m slamags_jax.bench --mode embed --size 48 --batch 256 --steps 10
  python -m slamags_jax.bench --mode mil --bags 48 --bag-size 200 --dim 512 --steps 50
  python -m slamags_jax.bench --mode matmul --matmul-n 2048 --steps 10
  python -m slamags_jax.bench --mode input --workers 0,1,2 --steps 5
  python -m slamags_jax.bench --mode input --image-size 250 --crop 224 --batch 256 --cells 512 --workers 1,2,4
  python -m slamags_jax.bench --mode input --on-device --workers 0
  python -m slamags_jax.bench --mode aggregate --tasks 2,4,8 --params 100000,1000000,10000000

`--mode step` (default) builds the model and a synthetic batch of P positive and N
negative patches (two views each, S px), compiles the full training step (all views,
task gradients, surgery, weight decay, SGD; the state is donated, nothing leaves the
device between steps), runs one warm-up step and K timed steps, and prints as its last
line one JSON object with:

- `images_per_second`: patches per second (P + N per step), from the median step time
  (`step_ms`; `step_ms_min` is the fastest step);
- `loss`: the training loss of the first step, i.e. of the seed's initial parameters
  (`last_loss`: of the last timed step); `param_l2`: the L2 norm of all trained
  parameters after the K + 1 steps;
- `devices`, `flops_per_step` (XLA's count for the compiled step), `gflops_per_second`;
- `malloc_hugepages`: whether malloc got transparent huge pages (``slamags_jax.runtime.hugepages``:
  run as a command, the bench re-executes itself with them where that takes effect);
- with `--surgery-overhead` (two-task methods): the same step with the task gradients
  summed (`weaksupcon`), timed interleaved with this one, and `surgery_overhead`
  = step_ms / sum_step_ms - 1.

With several devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4` on CPU, or
GPUs/TPUs) the batch is sharded over all of them. Why `loss` is the first step's: on
tiny synthetic batches the training is so sensitive that float32 rounding differences
(any reordering of a sum, e.g. across devices or rows) grow about 100x per step; the
first loss and `param_l2` agree across device counts to float32 rounding, and
tests/test_parallel.py checks equality in float64 over several steps.

`--mode embed` times the jitted, batched embedding of B cells (eval mode) and prints
`images_per_second`. `--mode mil` times MIL training steps (`mil.bags_per_step` bags
of `--bag-size` cells of `--dim` features) and batched inference, printing
`train_bags_per_second` and `infer_bags_per_second`. `--mode matmul` times one square
float32 matmul of side `--matmul-n` and prints its `gflops_per_second`: the machine's
measured matmul peak, against which the step's GFLOP/s are read.

`--mode input` times the pretraining input pipeline (``input_pipeline.pretrain_data``,
grain, the views of ``--method``) on a synthetic set of ``--cells`` JPEG cells of
``--image-size`` px that it writes to a temporary folder: ``--batch`` patches of two
``--crop`` px views per step, for each worker count of ``--workers`` (``data.workers``;
0 = in this process), ``--steps`` timed batches after one warm-up batch. By default
every access decodes its JPEG (``--cache none``: a paper-scale pool is far larger than
the decoded-cell cache); ``--cache pipeline`` keeps the pipeline's cache. Each entry of
``results`` has `views_per_second` (2 views per patch) and `views_per_cpu_second`: views
per second of CPU time used by this process and its workers (Linux ``/proc``; that is,
views/s per busy core). With ``--on-device`` the host only decodes and resizes
(``augment.on_device``) and the views are cut by the jitted ``device_augment`` on the
default device, inside the timed loop; `device_views_per_second` is that augmentation
alone on a batch already on the device.

`--mode aggregate` times every ``slamags_jax.surgery`` aggregator against TorchJD's
(``slamags_jax.benchmarks.aggregate``; one JSON line per transform, task and parameter count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from slamags_jax import app, models, pretrain
from slamags_jax import config as config_lib
from slamags_jax.models import conv
from slamags_jax.runtime import hugepages, parallel
from slamags_jax.runtime.errors import UserError


def _flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", float("nan")))
  except Exception:  # cost analysis is best effort on some backends
    return float("nan")


def _host() -> dict:
  """Where the numbers were taken: the JAX backend and whether malloc got huge pages."""
  return {"backend": jax.default_backend(), "malloc_hugepages": hugepages.active()}


def _cfg(a) -> "config_lib.ml_collections.ConfigDict":
  cfg = config_lib.get_base_config()
  cfg.seed = a.seed
  cfg.pretrain.method = a.method
  cfg.model.width = a.width
  cfg.model.depth = a.depth
  cfg.model.conv_impl = a.conv_impl
  cfg.model.dtype = a.dtype
  return cfg


def _timed(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


class _Step:
  """One compiled training step of a method on a fixed synthetic batch."""

  def __init__(self, cfg, method_name: str, batch, mesh, size: int):
    method = pretrain.METHODS[method_name]
    self.model = models.from_config(cfg, device_groups=1 if cfg.model.bn_sync else mesh.size)
    self.tx = pretrain.make_optimizer(cfg, method, steps_per_epoch=1000)
    self.state = parallel.replicate(pretrain.create_train_state(self.model, self.tx, jax.random.key(cfg.seed),
                                                                size), mesh)
    self.batch = batch
    step = jax.jit(
        lambda s, b: pretrain.train_step(s, b, model=self.model, tx=self.tx, method=method,
                                         mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                                         temperature=cfg.pretrain.temperature),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)), donate_argnums=0,
        compiler_options=conv.compiler_options())
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.metrics = None

  def __call__(self):
    self.state, self.metrics = self.compiled(self.state, self.batch)
    return self.state


def bench_step(a) -> dict:
  cfg = _cfg(a)
  if not pretrain.METHODS[a.method].tasks:
    raise UserError("--method random has no training step to time")
  mesh = parallel.data_mesh()
  n_dev = mesh.size
  if a.pos % n_dev or a.neg % n_dev:
    raise UserError(f"--pos and --neg must be multiples of the {n_dev} devices")
  if a.surgery_overhead and len(pretrain.METHODS[a.method].tasks) < 2:  # before any compile
    raise UserError("--surgery-overhead needs a two-task method (slam_ags, pcgrad)")
  rng = np.random.default_rng(a.seed)
  batch = parallel.global_batch({"pos": rng.integers(0, 256, (a.pos, 2, a.size, a.size, 3), dtype=np.uint8),
                                 "neg": rng.integers(0, 256, (a.neg, 2, a.size, a.size, 3), dtype=np.uint8)}, mesh)
  step = _Step(cfg, a.method, batch, mesh, a.size)
  step()  # warm-up step (first-run allocations); its loss is that of the initial parameters
  first_loss = float(step.metrics["loss"])
  baseline = None
  if a.surgery_overhead:
    baseline = _Step(cfg, "weaksupcon", batch, mesh, a.size)
    baseline()
    times, base_times = [], []
    for _ in range(a.steps):  # interleaved, so a busy neighbour hits both alike
      times += _timed(step, 1)
      base_times += _timed(baseline, 1)
  else:
    times = _timed(step, a.steps)
  dt = float(np.median(times))
  flops = _flops(step.compiled)
  out = {
      "mode": "step", "method": a.method, "pos": a.pos, "neg": a.neg, "size": a.size, "width": a.width,
      "depth": a.depth, "conv_impl": a.conv_impl, "dtype": a.dtype, "steps": a.steps,
      "devices": n_dev, **_host(),
      "step_ms": round(dt * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
      "images_per_second": round((a.pos + a.neg) / dt, 2),
      "loss": first_loss, "last_loss": float(step.metrics["loss"]),
      "param_l2": pretrain.param_l2(step.state.params),
      "flops_per_step": flops, "gflops_per_second": round(flops / dt / 1e9, 1),
      "compile_s": round(step.compile_s, 1),
  }
  if baseline is not None:
    base = float(np.median(base_times))
    out.update(sum_step_ms=round(base * 1e3, 2), sum_step_ms_min=round(min(base_times) * 1e3, 2),
               surgery_overhead=round(dt / base - 1.0, 4),
               surgery_overhead_min=round(min(times) / min(base_times) - 1.0, 4))
  return out


def bench_embed(a) -> dict:
  from slamags_jax import embed
  cfg = _cfg(a)
  mesh = parallel.data_mesh()
  batch = 256 if a.batch is None else a.batch
  batch = max(mesh.size, batch - batch % mesh.size)
  model = models.from_config(cfg)
  variables = parallel.replicate(pretrain.init_variables(model, jax.random.key(a.seed), a.size), mesh)
  fn = embed.make_embed_fn(model, cfg, mesh)
  images = parallel.global_batch(np.random.default_rng(a.seed).integers(0, 256, (batch, a.size, a.size, 3),
                                                                         dtype=np.uint8), mesh)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(variables, images))
  compile_s = time.perf_counter() - t0
  dt = float(np.median(_timed(lambda: fn(variables, images), a.steps)))
  return {"mode": "embed", "size": a.size, "width": a.width, "depth": a.depth, "batch": batch,
          "devices": mesh.size, **_host(), "embedding": cfg.model.embedding,
          "batch_ms": round(dt * 1e3, 2), "images_per_second": round(batch / dt, 1),
          "compile_s": round(compile_s, 1)}


def bench_mil(a) -> dict:
  from slamags_jax import mil
  cfg = config_lib.get_base_config()
  cfg.mil.model = a.mil_model
  cfg.mil.bags_per_step = a.bags_per_step
  mesh = parallel.data_mesh()
  rng = np.random.default_rng(a.seed)
  bags = [{"id": str(i), "split": "train", "label": i % 2, "k": 0,
           "embeddings": rng.standard_normal((a.bag_size, a.dim)).astype(np.float32),
           "cell_ids": np.arange(a.bag_size)} for i in range(a.bags)]
  model = mil.make_model(cfg.mil)
  params = mil.init_model(model, jax.random.key(a.seed), a.dim)
  tx = mil.make_optimizer(cfg.mil)
  length = mil.bucket_length(a.bag_size)
  slots, shard = mil.step_layout(a.bags_per_step, mesh.size)
  step = mil.make_train_step(model, tx, cfg.mil.cluster_weight, mesh, shard)
  opt_state = tx.init(params)
  batches = [mil.pad_batch(bags[i:i + a.bags_per_step], length, slots, a.dim)
             for i in range(0, a.bags - a.bags_per_step + 1, a.bags_per_step)]
  key = jax.random.key(a.seed)
  state = {"params": params, "opt": opt_state, "i": 0}

  def one():
    b = batches[state["i"] % len(batches)]
    state["params"], state["opt"], loss, _ = step(state["params"], state["opt"], b, key, state["i"])
    state["i"] += 1
    return loss

  jax.block_until_ready(one())  # compile
  train_dt = float(np.median(_timed(one, a.steps)))
  forward = mil.make_forward(model, mesh)
  mil.predict(model, state["params"], bags, length, forward=forward)  # compile
  t0 = time.perf_counter()
  mil.predict(model, state["params"], bags, length, forward=forward)
  infer_dt = time.perf_counter() - t0
  return {"mode": "mil", "mil_model": a.mil_model, "bags": a.bags, "bag_size": a.bag_size, "dim": a.dim,
          "bags_per_step": a.bags_per_step, "devices": mesh.size, **_host(),
          "train_step_ms": round(train_dt * 1e3, 3),
          "train_bags_per_second": round(a.bags_per_step / train_dt, 1),
          "infer_bags_per_second": round(a.bags / infer_dt, 1)}


def bench_matmul(a) -> dict:
  n = a.matmul_n
  rng = np.random.default_rng(a.seed)
  x = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(x, y))  # compile
  dt = float(np.median(_timed(lambda: f(x, y), a.steps)))
  return {"mode": "matmul", "n": n, "dtype": "float32", "devices": 1, **_host(),
          "matmul_ms": round(dt * 1e3, 2), "gflops_per_second": round(2 * n ** 3 / dt / 1e9, 1)}


def _synthetic_cells(root: str, n: int, size: int, seed: int) -> dict:
  """``n`` JPEG cells of ``size`` px under ``root`` and a manifest: half in positive, half in
  negative training bags. A smooth background and a disc with mild noise, so they decode
  like cell photographs rather than like noise (which JPEG compresses badly)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
  cells = []
  for i in range(n):
    cls = "pos" if i < n // 2 else "neg"
    cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.35)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
    back = 200 + 30 * np.stack([yy, xx, 1 - yy], axis=-1)
    img = np.where(disc, rng.uniform(60, 180, 3), back) + rng.normal(0, 6, (size, size, 3))
    path = f"{cls}/cell_{i:05d}.jpg"
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, path), quality=90)
    cells.append({"id": i, "path": path, "class": cls, "label": 0, "pool": "train"})
  half = n // 2
  bags = [{"id": "train-000", "split": "train", "label": 1, "k": 1, "cells": list(range(half))},
          {"id": "train-001", "split": "train", "label": 0, "k": 0, "cells": list(range(half, n))}]
  return {"format": "slamags-bags/1", "root": root, "seed": seed, "cells": cells, "bags": bags}


def _cpu_seconds() -> dict[int, float] | None:
  """CPU seconds of this process and each live descendant (grain's workers) by pid, from Linux ``/proc``."""
  try:
    tick = os.sysconf("SC_CLK_TCK")
    pids, out, i = [os.getpid()], {}, 0
    while i < len(pids):
      pid, i = pids[i], i + 1
      try:
        with open(f"/proc/{pid}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        for tid in os.listdir(f"/proc/{pid}/task"):
          with open(f"/proc/{pid}/task/{tid}/children") as f:
            pids += [int(c) for c in f.read().split()]
      except FileNotFoundError:  # a descendant that exited meanwhile
        continue
    return out
  except (OSError, ValueError, IndexError):
    return None


def _cpu_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
  """CPU used between two ``_cpu_seconds`` readings by the processes alive at the second.

  Per pid, so a process that exits in between (an earlier iterator's worker) takes
  nothing away; one that starts in between counts whole.
  """
  if before is None or after is None:
    return None
  return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _parse_workers(text: str) -> list[int]:
  try:
    workers = [int(w) for w in text.split(",") if w.strip()]
  except ValueError:
    workers = []
  if not workers or any(w < 0 or w > 64 for w in workers):
    raise UserError(f"--workers must be a comma list of worker counts in 0..64, got {text!r}")
  return workers


def bench_input(a) -> dict:
  from slamags_jax.data import device_augment, input_pipeline
  workers = _parse_workers(a.workers)
  batch = 32 if a.batch is None else a.batch
  if not 8 <= a.crop <= a.image_size:
    raise UserError(f"--crop must be in 8..--image-size ({a.image_size}), got {a.crop}")
  if batch < 2 or a.cells < batch:
    raise UserError(f"--cells ({a.cells}) must be at least --batch ({batch}) and --batch at least 2")
  cfg = config_lib.get_base_config()
  cfg.seed = a.seed
  cfg.data.image_size, cfg.data.crop_size = a.image_size, a.crop
  cfg.pretrain.batch_size = batch
  method = pretrain.METHODS[a.method]
  steps_per_epoch = a.cells // batch
  cfg.pretrain.epochs = -(-(a.steps + 1) // steps_per_epoch)
  mesh = parallel.data_mesh()
  spec = device_augment.spec_from_config(cfg.augment)
  augment_fn = jax.jit(lambda b: device_augment.augment_batch(b, seed=a.seed, crop=a.crop, spec=spec,
                                                             neg_center_view=method.neg_center_view),
                       in_shardings=(parallel.batch_sharding(mesh),), out_shardings=parallel.batch_sharding(mesh))
  results, device_vps = [], None
  with tempfile.TemporaryDirectory(prefix="slamags-bench-input-") as root:
    manifest = _synthetic_cells(root, a.cells, a.image_size, a.seed)
    for w in workers:
      data = input_pipeline.pretrain_data(manifest, cfg, seed=a.seed, neg_center_view=method.neg_center_view,
                                          multiple_of=mesh.size, workers=w, on_device=a.on_device,
                                          cache_bytes=0 if a.cache == "none" else None)

      def one(it):
        b = next(it)
        if a.on_device:
          b = jax.block_until_ready(augment_fn(parallel.global_batch(b, mesh)))
        return b

      it = data.iterator()
      try:
        first = one(it)  # warm-up: worker start, first decodes, the augmentation's compile
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(a.steps):
          one(it)
        dt, cpu1 = time.perf_counter() - t0, _cpu_seconds()
      finally:
        if hasattr(it, "close"):
          it.close()
      views = 2 * batch * a.steps
      cpu = _cpu_delta(cpu0, cpu1)
      results.append({"workers": w, "batch_ms": round(dt / a.steps * 1e3, 2),
                      "views_per_second": round(views / dt, 1),
                      "cpu_s": None if cpu is None else round(cpu, 2),
                      "views_per_cpu_second": round(views / cpu, 1) if cpu else None})
      if a.on_device and device_vps is None:  # the device's share alone, on a batch already there
        cells = parallel.global_batch(data.batch(0), mesh)
        jax.block_until_ready(augment_fn(cells))
        device_vps = round(2 * batch / float(np.median(_timed(lambda: augment_fn(cells), a.steps))), 1)
      del first
  out = {"mode": "input", "image_size": a.image_size, "crop": a.crop, "batch": batch, "steps": a.steps,
         "cells": a.cells, "method": a.method, "on_device": a.on_device, "cache": a.cache,
         "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
         "devices": mesh.size, **_host(), "results": results}
  if a.on_device:
    out["device_views_per_second"] = device_vps
  return out


@app.guarded
def main(argv=None) -> None:
  p = app.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mode", choices=("step", "embed", "mil", "matmul", "input", "aggregate"), default="step")
  p.add_argument("--pos", type=int, default=32, help="positive patches per step")
  p.add_argument("--neg", type=int, default=32, help="negative patches per step")
  p.add_argument("--size", type=int, default=64, help="crop size in px")
  p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
  p.add_argument("--method", default="slam_ags", choices=[m for m in config_lib.METHODS if m != "random"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--width", type=int, default=64, help="ResNet width (64 = torchvision)")
  p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
  p.add_argument("--conv-impl", dest="conv_impl", default="auto", choices=("auto", "xla", "matmul"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--surgery-overhead", action="store_true",
                 help="also time the same step with summed task gradients, interleaved")
  p.add_argument("--batch", type=int, default=None, help="[embed] cells per batch (256); [input] patches per step (32)")
  p.add_argument("--bags", type=int, default=48, help="[mil] training bags")
  p.add_argument("--bag-size", dest="bag_size", type=int, default=200, help="[mil] cells per bag")
  p.add_argument("--dim", type=int, default=512, help="[mil] embedding size")
  p.add_argument("--bags-per-step", dest="bags_per_step", type=int, default=1, help="[mil] bags per step")
  p.add_argument("--mil-model", dest="mil_model", default="pamil", choices=("pamil", "abmil"))
  p.add_argument("--matmul-n", dest="matmul_n", type=int, default=2048, help="[matmul] matrix side")
  p.add_argument("--image-size", dest="image_size", type=int, default=64, help="[input] cell size in px (paper: 250)")
  p.add_argument("--crop", type=int, default=56, help="[input] view size in px (paper: 224)")
  p.add_argument("--cells", type=int, default=96, help="[input] synthetic JPEG cells (at least --batch)")
  p.add_argument("--workers", default="0", help="[input] comma list of data.workers counts, e.g. 0,1,2,4")
  p.add_argument("--on-device", dest="on_device", action="store_true",
                 help="[input] host decodes only; views cut by the jitted device_augment (augment.on_device)")
  p.add_argument("--cache", choices=("none", "pipeline"), default="none",
                 help="[input] decode every access (none) or keep the pipeline's decoded-cell cache")
  p.add_argument("--tasks", default="2,4,8", help="[aggregate] comma list of task counts")
  p.add_argument("--params", default="100000,1000000,10000000",
                 help="[aggregate] comma list of parameter counts")
  p.add_argument("--transforms", default="", help="[aggregate] comma list of names (default: all)")
  p.add_argument("--stacking", choices=("materialized", "in_step"), default="materialized",
                 help="[aggregate] one stacked pytree (as from jax.jacrev) or per-task pytrees stacked in the jit")
  a = p.parse_args(argv)
  if a.mode == "aggregate":  # one JSON line per transform, printed as they finish
    from slamags_jax.benchmarks import aggregate
    aggregate.run(a)
    return
  result = {"step": bench_step, "embed": bench_embed, "mil": bench_mil, "matmul": bench_matmul,
            "input": bench_input}[a.mode](a)
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run_argparse(main)
