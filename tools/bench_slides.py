r"""Scale benchmark of the slides path: cells/s and peak RSS of bags, embed, MIL and predict.

  nice -n 19 python launch/bench_slides.py --slides 20 --cells-per-slide 1000 --workdir /tmp/bench20k
  nice -n 19 python launch/bench_slides.py --slides 20 --cells-per-slide 10000 --workdir /tmp/bench200k

Builds a synthetic slide set under ``<workdir>/data`` in the ``bags.source=slides``
layout: hard links to the in-repo PBC sample's images, repeated (so the files are real
JPEGs but the set costs no disk); half the slides ``normal`` (lymphocytes and
neutrophils), half ``abnormal`` (10 % erythroblasts). Then runs each stage of
``python -m slamags_jax.main --config=configs/demo.py`` as its own process under
``/usr/bin/time -v`` (wall time, CPU time (user + system) and peak RSS of that process), with the ``random``
encoder (pretraining is not what this measures), 2 folds (fold 0), 3 MIL epochs, and
last ``python -m slamags_jax.predict`` on every slide. Prints one JSON line per stage
and writes them to ``<workdir>/bench.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time

from tools import REPO

SAMPLE = os.path.join(REPO, "sample_data", "pbc")


def _images(kind: str) -> list[str]:
  folder = os.path.join(SAMPLE, kind)
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))


def make_set(root: str, slides: int, per_slide: int) -> dict[str, str]:
  """Hard-linked slide folders and their CSV; returns the paths."""
  normal = _images("lymphocyte") + _images("neutrophil")
  abnormal = _images("erythroblast")
  data = os.path.join(root, "data", "slides")
  rows = []
  for s in range(slides):
    sid = f"slide{s:04d}"
    label = "abnormal" if s % 2 else "normal"
    folder = os.path.join(data, sid)
    os.makedirs(folder, exist_ok=True)
    n_abn = per_slide // 10 if label == "abnormal" else 0
    for i in range(per_slide):
      src = abnormal[(s + i) % len(abnormal)] if i < n_abn else normal[(s * 7 + i) % len(normal)]
      dst = os.path.join(folder, f"c{i:06d}.jpg")
      if not os.path.exists(dst):
        try:
          os.link(src, dst)
        except OSError:  # another file system: copy
          with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read())
    rows.append((sid, label, f"p{s:04d}"))
  csv_path = os.path.join(root, "data", "slides.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide_id", "label", "patient_id"])
    w.writerows(rows)
  return {"root": data, "csv": csv_path}


def timed(cmd: list[str], log: str) -> dict[str, float]:
  """Runs ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (MiB) of the process."""
  t0 = time.perf_counter()
  with open(log, "a") as f:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, stdout=f, stderr=subprocess.PIPE, text=True)
    f.write(proc.stderr)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-3000:])
    raise SystemExit(f"failed: {' '.join(cmd)}")
  rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
  cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
  return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
          "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None}


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--slides", type=int, default=20)
  ap.add_argument("--cells-per-slide", type=int, default=1000)
  ap.add_argument("--workdir", required=True)
  args = ap.parse_args()
  root = os.path.abspath(args.workdir)
  t0 = time.perf_counter()
  paths = make_set(root, args.slides, args.cells_per_slide)
  n = args.slides * args.cells_per_slide
  results = [{"stage": "make set", "cells": n, "wall_s": round(time.perf_counter() - t0, 2)}]
  run = os.path.join(root, "run")
  log = os.path.join(root, "bench.log")
  base = [sys.executable, "-m", "slamags_jax.main", "--config=configs/demo.py", f"--workdir={run}",
          "--config.bags.source=slides", f"--config.data.root={paths['root']}",
          f"--config.data.slides_csv={paths['csv']}", "--config.data.negative_labels=normal",
          "--config.bags.folds=2", "--config.pretrain.method=random", "--config.mil.epochs=3",
          "--config.report.gallery_max_cells=10"]
  for stage in ("bags", "pretrain", "embed", "mil", "report"):
    r = timed(base + [f"--config.stages={stage}"], log)
    results.append({"stage": stage, "cells": n, **r})
    print(json.dumps(results[-1]), flush=True)
  r = timed([sys.executable, "-m", "slamags_jax.predict", f"--workdir={run}", f"--slides={paths['root']}",
             f"--out={os.path.join(root, 'predict')}"], log)
  results.append({"stage": "predict", "cells": n, **r})
  print(json.dumps(results[-1]), flush=True)
  for r in results:
    if r.get("wall_s"):
      r["cells_per_s"] = round(r["cells"] / r["wall_s"], 1)
    if r.get("cpu_s"):  # the process's own CPU time: what the stage costs when the CPU is shared
      r["cells_per_cpu_s"] = round(r["cells"] / r["cpu_s"], 1)
  idx = json.load(open(os.path.join(run, "embeddings", "index.json")))
  mil = json.load(open(os.path.join(run, "mil", "summary.json")))
  extra = {"embed_cells_per_s_in_stage": idx.get("cells_per_second"), "mil_train_wall_s": mil.get("train_wall_s"),
           "mil_train_bags_per_s": mil.get("train_bags_per_s"), "mil_padded_length": mil.get("padded_length"),
           "manifest_mib": round(os.path.getsize(os.path.join(run, "bags", "manifest.json")) / 2**20, 2)}
  with open(os.path.join(root, "bench.json"), "w") as f:
    json.dump({"results": results, **extra}, f, indent=1)
  print(json.dumps(extra), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
