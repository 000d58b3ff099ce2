r"""Does bfloat16 compute learn as float32 does? A short PBC-ERB pretraining in both (issue 19).

  python launch/bf16_check.py                 # runs the three pretrainings (resumable), then compares
  python launch/bf16_check.py --no-run        # compares the finished workdirs only
  python launch/bf16_check.py --epochs 1 --out workdirs/bf16_check/check.json

Three pretrainings of ``configs/pbc_erb.py`` (``--method`` slam_ags_heads, witness rate
10 %, stages ``bags,pretrain`` only, ``--epochs`` 2), each one subprocess of
``python -m slamags_jax.main`` into ``<workdir-root>/<dtype>_seed<seed>``:

- float32, seed ``--seed`` (0): the reference;
- bfloat16 (``model.dtype=bfloat16``: the encoder computes in bf16, parameters,
  BatchNorm statistics, losses and surgery stay float32), the same seed;
- float32, seed ``--noise-seed`` (1): the noise reference. ``data.seed`` is pinned to
  ``--seed`` in all three, so the bags are the same and the seeds differ only in the
  initialisation and the augmentation draws.

From each run's ``pretrain/metrics.jsonl``: per epoch, the mean of every loss over the
epoch's steps (``loss``, ``loss/ntxent``, ``loss/similarity``) and the probe set's
effective ranks (embedded, head, pooled features). bf16 is *within noise* for a metric
when its largest per-epoch distance from the float32 run of the same seed is at most the
largest per-epoch distance between the two float32 seeds; the noise reference is itself
one measurement (one pair of seeds), so read a ratio near 1 as "as different as another
seed", not as a failure. Writes one JSON (``--out``; the curves, distances, verdicts and
each run's pretraining wall time) and prints a table.

Expected run time on 2 CPU cores at 2 epochs: about 1 minute per float32 run; bf16 on a
CPU without native bf16 arithmetic can be several times slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

from slamags_jax import app
from tools import REPO

CONFIG = os.path.join(REPO, "configs", "pbc_erb.py")
LOSSES = ("loss", "loss/ntxent", "loss/similarity")
RANKS = ("effective_rank", "head_effective_rank", "pooled_effective_rank")


class BadArgs(ValueError):
  pass


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--method", default="slam_ags_heads")
  p.add_argument("--witness-rate", dest="witness_rate", type=float, default=0.1)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--noise-seed", dest="noise_seed", type=int, default=1)
  p.add_argument("--data-root", dest="data_root", default="", help="data.root (default: the config's)")
  p.add_argument("--workdir-root", dest="workdir_root", default=os.path.join(REPO, "workdirs", "bf16_check"))
  p.add_argument("--out", default="", help="the JSON (default: <workdir-root>/check.json)")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--no-run", dest="no_run", action="store_true", help="compare finished workdirs only")
  args = p.parse_args(argv)
  if args.epochs < 1:
    raise BadArgs(f"--epochs must be >= 1, got {args.epochs}")
  if not 0 < args.witness_rate <= 1:
    raise BadArgs(f"--witness-rate must be in (0, 1], got {args.witness_rate}")
  if min(args.seed, args.noise_seed) < 0 or args.seed == args.noise_seed:
    raise BadArgs(f"--seed and --noise-seed must be two different non-negative seeds, got {args.seed} and "
                  f"{args.noise_seed}")
  if not os.path.isfile(args.config):
    raise BadArgs(f"--config {args.config!r} is not a file")
  if args.data_root and not os.path.isdir(args.data_root):
    raise BadArgs(f"--data-root {args.data_root!r} is not a folder")
  args.out = args.out or os.path.join(args.workdir_root, "check.json")
  return args


def runs_of(args: argparse.Namespace) -> dict[str, tuple[str, int]]:
  """name -> (dtype, seed): the reference, the bf16 run, the noise reference."""
  return {"float32": ("float32", args.seed), "bfloat16": ("bfloat16", args.seed),
          "float32_noise": ("float32", args.noise_seed)}


def workdir_of(args: argparse.Namespace, dtype: str, seed: int) -> str:
  return os.path.join(args.workdir_root, f"{dtype}_seed{seed}")


def command_of(args: argparse.Namespace, dtype: str, seed: int) -> list[str]:
  cmd = [args.python, "-m", "slamags_jax.main", f"--config={args.config}",
         f"--workdir={workdir_of(args, dtype, seed)}", "--config.stages=bags,pretrain",
         f"--config.pretrain.method={args.method}", f"--config.bags.witness_rate={args.witness_rate}",
         f"--config.seed={seed}", f"--config.data.seed={args.seed}", f"--config.pretrain.epochs={args.epochs}",
         f"--config.model.dtype={dtype}"]
  if args.data_root:
    cmd.append(f"--config.data.root={args.data_root}")
  return cmd


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def curves(records: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
  """metrics.jsonl records -> per-epoch mean of each loss and each probe rank, by epoch."""
  steps = [r for r in records if r.get("kind") == "step" and not r.get("skipped")]
  epochs = sorted({int(r["epoch"]) for r in records if r.get("kind") in ("step", "epoch")})
  out: dict[str, list[float | None]] = {"epoch": [float(e) for e in epochs]}
  for key in LOSSES:
    vals = []
    for e in epochs:
      xs = [float(r[key]) for r in steps if int(r["epoch"]) == e and key in r]
      vals.append(sum(xs) / len(xs) if xs else None)
    if any(v is not None for v in vals):
      out[key] = vals
  by_epoch = {int(r["epoch"]): r for r in records if r.get("kind") == "epoch"}
  for key in RANKS:
    vals = [by_epoch.get(e, {}).get(key) for e in epochs]
    if any(v is not None for v in vals):
      out[key] = [None if v is None else float(v) for v in vals]
  return out


def _max_abs(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
  d = [abs(x - y) for x, y in zip(a, b) if x is not None and y is not None]
  return max(d) if d else None


def compare(ref: Mapping[str, list], test: Mapping[str, list], noise: Mapping[str, list]) -> dict[str, Any]:
  """Per metric: the largest per-epoch |test - ref| against the largest |noise - ref| (see module docstring)."""
  out: dict[str, Any] = {}
  for key in (*LOSSES, *RANKS):
    if key not in ref or key not in test or key not in noise:
      continue
    diff, ref_noise = _max_abs(test[key], ref[key]), _max_abs(noise[key], ref[key])
    if diff is None or ref_noise is None:
      continue
    out[key] = {"float32": ref[key], "bfloat16": test[key], "noise_ref": noise[key],
                "max_abs_diff": diff, "max_noise": ref_noise,
                "diff_over_noise": diff / ref_noise if ref_noise > 0 else (0.0 if diff == 0 else math.inf),
                "within_noise": diff <= ref_noise}
  return out


def _fmt(x: float | None) -> str:
  return "-" if x is None else f"{x:.4f}"


def table(comparison: Mapping[str, Any], epochs: Sequence[float]) -> str:
  lines = ["| metric | epoch | float32 | bfloat16 | float32 other seed | abs(bf16 - f32) | abs(seed - seed) |",
           "|---|---|---|---|---|---|---|"]
  for key, c in comparison.items():
    for i, e in enumerate(epochs):
      f, b, n = c["float32"][i], c["bfloat16"][i], c["noise_ref"][i]
      d = None if f is None or b is None else abs(b - f)
      dn = None if f is None or n is None else abs(n - f)
      lines.append(f"| {key} | {int(e)} | {_fmt(f)} | {_fmt(b)} | {_fmt(n)} | {_fmt(d)} | {_fmt(dn)} |")
  lines.append("")
  for key, c in comparison.items():
    lines.append(f"{key}: max abs(bf16 - f32) {c['max_abs_diff']:.4f} vs noise {c['max_noise']:.4f} "
                 f"(ratio {c['diff_over_noise']:.2f}): {'within noise' if c['within_noise'] else 'OUTSIDE noise'}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except BadArgs as e:
    sys.stderr.write(app.error_line(e))
    return 2
  runs = runs_of(args)
  results: dict[str, Any] = {}
  for name, (dtype, seed) in runs.items():
    work = workdir_of(args, dtype, seed)
    if not args.no_run:
      print(f"{name}: {' '.join(command_of(args, dtype, seed))}", flush=True)
      status = subprocess.call(command_of(args, dtype, seed), cwd=REPO)
      if status:
        sys.stderr.write(app.error_line(
            f"the {name} pretraining exited with status {status} (log above; workdir {work})"))
        return 1
    metrics = os.path.join(work, "pretrain", "metrics.jsonl")
    summary = os.path.join(work, "pretrain", "summary.json")
    if not os.path.isfile(summary):
      sys.stderr.write(app.error_line(
          f"{work} holds no finished pretraining ({summary} is missing); run without --no-run"))
      return 1
    with open(summary, encoding="utf-8") as f:
      wall = json.load(f).get("wall_s")
    results[name] = {"dtype": dtype, "seed": seed, "workdir": work, "pretrain_wall_s": wall,
                     "curves": curves(read_jsonl(metrics))}
  c = {name: r["curves"] for name, r in results.items()}
  comparison = compare(c["float32"], c["bfloat16"], c["float32_noise"])
  report = {"config": os.path.relpath(args.config, REPO), "method": args.method, "witness_rate": args.witness_rate,
            "epochs": args.epochs, "runs": results, "comparison": comparison,
            "within_noise": all(v["within_noise"] for v in comparison.values())}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  os.replace(args.out + ".tmp", args.out)
  print(table(comparison, c["float32"]["epoch"]))
  print("pretraining wall s: " + ", ".join(f"{n} {r['pretrain_wall_s']}" for n, r in results.items()))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
