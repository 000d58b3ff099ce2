r"""Fault injection: kill the pipeline at random points, rerun until done, compare every output.

  nice -n 19 .venv/bin/python launch/faults.py --kills 30 [--config=configs/demo.py] \
      [--seed 0] [--root /tmp/slamags_faults] [--cases all|none|<name>,...] [-- --config.<key>=<value> ...]

What it does (the long form of the fault tests; tests/test_faults.py runs a cheap one):

1. A reference: the command run once, uninterrupted, in ``<root>/reference``; the time each
   stage took is noted from its log.
2. ``--kills N`` faults, seeded: fault i targets stage ``STAGES[i % 5]`` with ``kill -9``
   or SIGTERM (drawn), at a point drawn uniformly within that stage's reference duration
   after this attempt's log says the stage started. Faults are applied one after another
   to a campaign's workdir (each followed by a rerun of the same command) while their
   stages are still to run there; then the campaign's last rerun completes, its outputs
   are compared with the reference and the next faults go to a fresh workdir. A signal
   counts as a fault only if the process was alive to receive it (a planned fault that
   found the run already done moves, earlier, to the next campaign). Every attempt must end
   by the signal (kill -9: -9; SIGTERM: 143 in a training loop, -15 elsewhere) or complete
   (0); anything else is a failure.
3. The four cases of issue #18, each compared with the reference the same way:
   ``sigterm_sparse`` (SIGTERM in pretraining with checkpoint_every_steps=1000: exit 143,
   the step saved), ``second_run`` (a second run on the workdir in use gets exit 2 and the
   ``in use by pid`` line, the first finishes), ``damaged`` (the newest checkpoint's data
   files truncated: the rerun warns and resumes from the one before) and ``disk_full``
   (the workdir on a tmpfs too small for the checkpoints: one ``error: ... ENOSPC`` line,
   exit 2; after the tmpfs is enlarged the rerun continues; needs root, else skipped).

Compared outputs: ``bags/manifest.json``; the encoder's arrays; ``pretrain/summary.json``
and ``metrics.jsonl``; every ``embeddings/`` file; ``mil/predictions.npz`` /
``predictions.json`` / ``summary.json`` / ``metrics.jsonl`` and the best and last MIL
parameters; every file in ``report/``. Timing fields (``TIMING_KEYS``, and the report's
"wall time" line) are left out of the comparison; everything else must be equal bit for
bit. Results go to stdout and ``<root>/faults.json``; exit status 1 on any difference or
failed attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from slamags_jax import pipeline
from tools import REPO

STAGES = pipeline.NAMES
MARKERS = pipeline.MARKERS
TIMING_KEYS = {"wall_s", "images_per_s", "images_per_second", "cells_per_second", "compile_s", "epoch_s", "train_s",
               "train_wall_s", "train_bags_per_s", "train_bags_per_second", "infer_bags_per_s",
               "infer_bags_per_second", "report_wall_s", "pretrain_wall_s", "mil_train_wall_s"}
TIMEOUT = 1800  # seconds for one attempt
CASES = ("sigterm_sparse", "second_run", "damaged", "disk_full")


# ----------------------------------------------------------------------------- running

class Attempt:
  """One run of the command, its stderr in a file."""

  def __init__(self, cmd: list[str], workdir: str, log: str):
    self.log = log
    with open(log, "w") as f:
      self.proc = subprocess.Popen(cmd + [f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=f)

  def text(self) -> str:
    with open(self.log, encoding="utf-8", errors="replace") as f:
      return f.read()

  def stage(self) -> str | None:
    """The stage this attempt has most recently started (from its log)."""
    text, now = self.text(), None
    for s in STAGES:
      if f"stage {s}: running" in text:
        now = s
    return now

  def started(self, stage: str) -> bool:
    return f"stage {stage}: running" in self.text()

  def alive(self) -> bool:
    return self.proc.poll() is None

  def wait(self) -> int:
    return self.proc.wait(timeout=TIMEOUT)

  def kill(self) -> None:
    if self.alive():
      self.proc.kill()
      self.proc.wait()


def reference(cmd: list[str], root: str) -> tuple[str, dict[str, float]]:
  """Runs the command uninterrupted; returns its workdir and each stage's duration (s)."""
  work = os.path.join(root, "reference")
  shutil.rmtree(work, ignore_errors=True)
  a = Attempt(cmd, work, work + ".log")
  seen: dict[str, float] = {}
  t0 = time.monotonic()
  while a.alive():
    for s in STAGES:
      if s not in seen and a.started(s):
        seen[s] = time.monotonic()
    time.sleep(0.02)
  end = time.monotonic()
  if a.proc.returncode != 0:
    raise SystemExit(f"the reference run failed (exit {a.proc.returncode}):\n{a.text()[-3000:]}")
  order = [s for s in STAGES if s in seen]
  durations = {s: (seen[order[i + 1]] if i + 1 < len(order) else end) - seen[s] for i, s in enumerate(order)}
  print(f"reference: {end - t0:.1f} s; stage durations " +
        ", ".join(f"{s} {d:.1f} s" for s, d in durations.items()), flush=True)
  return work, durations


def run_to_end(cmd: list[str], work: str, log: str) -> tuple[int, str]:
  a = Attempt(cmd, work, log)
  rc = a.wait()
  return rc, a.text()


# ----------------------------------------------------------------------------- comparing

def _drop_timing(obj):
  if isinstance(obj, dict):
    return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
  if isinstance(obj, list):
    return [_drop_timing(v) for v in obj]
  return obj


def _canon_json(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return json.dumps(_drop_timing(json.load(f)), sort_keys=True)


def _canon_jsonl(path: str) -> str:
  from slamags_jax.runtime import fileio
  return json.dumps([_drop_timing(r) for r in fileio.read_jsonl(path)], sort_keys=True)


def _same_arrays(a: dict, b: dict) -> bool:
  import numpy as np
  if sorted(a) != sorted(b):
    return False
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    if x.dtype != y.dtype or x.shape != y.shape:
      return False
    if not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
      return False
  return True


def _npz(path: str) -> dict:
  import numpy as np
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _flat(tree) -> dict:
  import jax
  import numpy as np
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _report_md(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return "".join(line for line in f if "wall time" not in line)


def _raw(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _loader(name: str):
  if name.endswith(".npz"):
    return _npz
  if name.endswith(".jsonl"):
    return _canon_jsonl
  if name.endswith(".json"):
    return _canon_json
  if name.endswith("report.md"):
    return _report_md
  return _raw


def compare(ref: str, work: str) -> tuple[int, list[str]]:
  """(outputs compared, the ones that differ) between two workdirs of the same command.

  What the reference holds is compared (a run of fewer stages has fewer outputs).
  """
  names = ["bags/manifest.json", "pretrain/summary.json", "pretrain/metrics.jsonl", "mil/predictions.npz",
           "mil/predictions.json", "mil/summary.json", "mil/metrics.jsonl"]
  for folder in ("embeddings", "report"):
    if os.path.isdir(os.path.join(ref, folder)):
      names += [f"{folder}/{n}" for n in sorted(os.listdir(os.path.join(ref, folder)))]
  names = [n for n in names if os.path.exists(os.path.join(ref, n))]
  compared, differ = 0, []
  for name in names:
    compared += 1
    fn = _loader(name)
    try:
      va, vb = fn(os.path.join(ref, name)), fn(os.path.join(work, name))
    except (OSError, ValueError) as e:
      differ.append(f"{name} ({type(e).__name__}: {e})")
      continue
    if not (_same_arrays(va, vb) if isinstance(va, dict) else va == vb):
      differ.append(name)
  # Arrays of the encoder and of the best and last MIL parameters.
  trees = {}
  if os.path.isdir(os.path.join(ref, "pretrain", "encoder")) or os.path.isdir(os.path.join(ref, "mil", "checkpoints")):
    from slamags_jax import mil
    from slamags_jax.runtime import checkpoints
  if os.path.isdir(os.path.join(ref, "pretrain", "encoder")):
    trees["pretrain/encoder"] = lambda w: checkpoints.load_encoder(os.path.join(w, "pretrain", "encoder"))
  if os.path.isdir(os.path.join(ref, "mil", "checkpoints")):
    for which in ("best", "last"):
      trees[f"mil/checkpoints[{which}]"] = lambda w, which=which: mil.load_checkpoint(w, which)[0]
  for name, load in trees.items():
    compared += 1
    try:
      same = _same_arrays(_flat(load(ref)), _flat(load(work)))
    except Exception as e:
      differ.append(f"{name} ({type(e).__name__}: {e})")
      continue
    if not same:
      differ.append(name)
  return compared, differ


# ----------------------------------------------------------------------------- random faults

def campaigns(cmd: list[str], root: str, ref: str, durations: dict[str, float], kills: int, seed: int) -> dict:
  rng = random.Random(seed)
  plan = [{"stage": STAGES[i % len(STAGES)], "kind": rng.choice(("kill9", "sigterm")), "u": rng.random()}
          for i in range(kills)]
  faults, attempts, results, failures = [], 0, [], []
  campaign = 0
  while plan or campaign == 0:
    campaign += 1
    work = os.path.join(root, f"campaign{campaign:02d}")
    shutil.rmtree(work, ignore_errors=True)
    done = False
    while not done:
      attempts += 1
      fault = plan[0] if plan else None
      if fault is not None and os.path.exists(os.path.join(work, MARKERS[fault["stage"]])):
        fault = None  # its stage is complete here: finish this campaign, the fault goes to a fresh workdir
      a = Attempt(cmd, work, f"{work}.attempt{attempts:03d}.log")
      if fault is not None:
        t_start = None
        while a.alive():
          if t_start is None and a.started(fault["stage"]):
            t_start = time.monotonic()
          if t_start is not None and time.monotonic() - t_start >= fault["u"] * durations.get(fault["stage"], 1.0):
            break
          if t_start is None and a.stage() is not None and STAGES.index(a.stage()) > STAGES.index(fault["stage"]):
            break  # the stage was complete already: fault the one running now
          time.sleep(0.005)
        landed = a.stage()
        sig = signal.SIGKILL if fault["kind"] == "kill9" else signal.SIGTERM
        if a.alive():
          os.kill(a.proc.pid, sig)
          rc = a.wait()
          ok = rc in ((-signal.SIGKILL,) if sig == signal.SIGKILL else (143, -signal.SIGTERM, 0))
          faults.append({**fault, "landed_in": landed, "rc": rc, "campaign": campaign, "attempt": attempts})
          plan.pop(0)
          print(f"fault {len(faults)}/{kills}: {fault['kind']} aimed at {fault['stage']}, landed in {landed}, "
                f"exit {rc}", flush=True)
          if not ok:
            failures.append(f"attempt {attempts}: {fault['kind']} gave exit {rc}:\n{a.text()[-2000:]}")
          if rc == 0:
            done = True  # the signal came as it finished
          continue
        fault["u"] *= 0.5  # the run ended first: this fault moves, earlier, to the next campaign
      rc = a.wait()
      if rc != 0:
        failures.append(f"attempt {attempts}: exit {rc} without a fault:\n{a.text()[-2000:]}")
        return {"faults": faults, "attempts": attempts, "campaigns": results, "failures": failures}
      done = True
    compared, differ = compare(ref, work)
    results.append({"campaign": campaign, "compared": compared, "differ": differ})
    print(f"campaign {campaign}: {compared} outputs compared, {len(differ)} differ {differ or ''}", flush=True)
  return {"faults": faults, "attempts": attempts, "campaigns": results, "failures": failures}


# ----------------------------------------------------------------------------- the four cases

def _wait_for(pred, proc: Attempt, limit: float = TIMEOUT) -> bool:
  t0 = time.monotonic()
  while proc.alive() and time.monotonic() - t0 < limit:
    if pred():
      return True
    time.sleep(0.005)
  return False


def _steps_logged(work: str) -> list[int]:
  from slamags_jax.runtime import fileio
  return [r["step"] for r in fileio.read_jsonl(os.path.join(work, "pretrain", "metrics.jsonl"))
          if r.get("kind") == "step"]


def _checkpoint_steps(work: str) -> list[int]:
  folder = os.path.join(work, "pretrain", "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def case_sigterm_sparse(cmd, work) -> list[str]:
  problems = []
  c = cmd + ["--config.pretrain.checkpoint_every_steps=1000"]
  a = Attempt(c, work, work + ".1.log")
  if not _wait_for(lambda: len(_steps_logged(work)) >= 3, a):
    a.kill()
    return ["pretraining ended before the signal"]
  os.kill(a.proc.pid, signal.SIGTERM)
  rc = a.wait()
  lines = [line for line in a.text().splitlines() if "SIGTERM received: finished step" in line]
  if rc != 143 or len(lines) != 1:
    problems.append(f"exit {rc}, {len(lines)} SIGTERM lines")
  elif int(lines[0].split("finished step ")[1].split()[0]) not in _checkpoint_steps(work):
    problems.append("the step named in the log has no checkpoint")
  rc, text = run_to_end(c, work, work + ".2.log")
  if rc != 0:
    problems.append(f"rerun exit {rc}: {text[-1500:]}")
  return problems


def case_second_run(cmd, work) -> list[str]:
  problems = []
  a = Attempt(cmd, work, work + ".1.log")
  lock = os.path.join(work, ".lock")
  _wait_for(lambda: os.path.exists(lock) and str(a.proc.pid) in open(lock).read(), a)
  rc, text = run_to_end(cmd, work, work + ".2.log")
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  if not a.alive():
    problems.append("the first run ended before the second was refused")
  if rc != 2 or len(errors) != 1 or f"is in use by pid {a.proc.pid} on host" not in errors[0]:
    problems.append(f"second run: exit {rc}, errors {errors}")
  if a.wait() != 0:
    problems.append(f"first run: exit {a.proc.returncode}: {a.text()[-1500:]}")
  return problems


def case_damaged(cmd, work) -> list[str]:
  problems = []
  a = Attempt(cmd, work, work + ".1.log")
  if not _wait_for(lambda: len(_checkpoint_steps(work)) >= 2 and len(_steps_logged(work)) > _checkpoint_steps(work)[-1],
                   a):
    a.kill()
    return ["pretraining ended before two checkpoints"]
  os.kill(a.proc.pid, signal.SIGKILL)
  a.wait()
  steps = _checkpoint_steps(work)
  newest = os.path.join(work, "pretrain", "checkpoints", str(steps[-1]))
  cut = 0
  for root, _, files in os.walk(newest):
    if os.path.basename(root) == "d":
      for name in files:
        p = os.path.join(root, name)
        os.truncate(p, os.path.getsize(p) // 2)
        cut += 1
  if not cut:
    return [f"no data file to damage in {newest}"]
  rc, text = run_to_end(cmd, work, work + ".2.log")
  if rc != 0:
    problems.append(f"rerun exit {rc}: {text[-1500:]}")
  if "Traceback" in text:
    problems.append("the rerun printed a traceback")
  if f"{newest} does not restore" not in text or f"checkpoint of step {steps[-2]} of" not in text:
    problems.append(f"the rerun did not name the damaged step {steps[-1]} and resume from {steps[-2]}")
  return problems


def case_disk_full(cmd, work) -> list[str] | None:
  os.makedirs(work, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", work], capture_output=True).returncode:
    return None  # not root: skipped
  problems = []
  try:
    rc, text = run_to_end(cmd, work, work + ".1.log")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if rc != 2 or len(errors) != 1 or "(ENOSPC, errno 28): " + work not in errors[0] or "Traceback" in text:
      problems.append(f"full disk: exit {rc}, errors {errors}")
    subprocess.run(["mount", "-o", "remount,size=64m", work], check=True)
    rc, text = run_to_end(cmd, work, work + ".2.log")
    if rc != 0:
      problems.append(f"rerun exit {rc}: {text[-1500:]}")
    keep = work + ".copy"  # compare outside the tmpfs, then unmount
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(work, keep)
  finally:
    subprocess.run(["umount", "-l", work], check=False)
  shutil.rmtree(work, ignore_errors=True)
  os.replace(keep, work)
  return problems


def run_cases(names, cmd, root, ref) -> list[dict]:
  out = []
  for name in names:
    work = os.path.join(root, f"case_{name}")
    shutil.rmtree(work, ignore_errors=True)
    problems = globals()[f"case_{name}"](cmd, work)
    if problems is None:
      print(f"case {name}: skipped (needs root for a tmpfs)", flush=True)
      out.append({"case": name, "skipped": True})
      continue
    finished = os.path.exists(os.path.join(work, "report", "summary.json"))
    compared, differ = compare(ref, work) if finished else (0, ["no outputs"])
    print(f"case {name}: {'ok' if not problems else problems}; {compared} outputs compared, {len(differ)} differ "
          f"{differ or ''}", flush=True)
    out.append({"case": name, "problems": problems, "compared": compared, "differ": differ})
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--kills", type=int, default=30, help="random faults to inject (default 30)")
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default="/tmp/slamags_faults", help="folder for the workdirs and logs (replaced)")
  ap.add_argument("--cases", default="all", help=f"all, none, or a comma list of {','.join(CASES)}")
  ap.add_argument("extra", nargs="*", help="more flags for the command, after --")
  args = ap.parse_args()
  names = CASES if args.cases == "all" else () if args.cases == "none" else tuple(args.cases.split(","))
  cmd = [sys.executable, "-m", "slamags_jax.main", f"--config={args.config}"] + args.extra
  os.makedirs(args.root, exist_ok=True)
  t0 = time.monotonic()
  ref, durations = reference(cmd, args.root)
  result = campaigns(cmd, args.root, ref, durations, args.kills, args.seed) if args.kills else \
      {"faults": [], "attempts": 0, "campaigns": [], "failures": []}
  cases = run_cases(names, cmd, args.root, ref)
  differ = sum(len(c["differ"]) for c in result["campaigns"]) + sum(len(c.get("differ", [])) for c in cases)
  compared = sum(c["compared"] for c in result["campaigns"]) + sum(c.get("compared", 0) for c in cases)
  problems = result["failures"] + [p for c in cases for p in c.get("problems", [])]
  by = {}
  for f in result["faults"]:
    key = f"{f['kind']}@{f['landed_in']}"
    by[key] = by.get(key, 0) + 1
  exits = {}
  for f in result["faults"]:
    exits[str(f["rc"])] = exits.get(str(f["rc"]), 0) + 1
  summary = {"command": " ".join(cmd), "seed": args.seed, "faults_injected": len(result["faults"]),
             "faults_by_kind_and_stage": dict(sorted(by.items())), "fault_exit_codes": dict(sorted(exits.items())),
             "attempts": result["attempts"],
             "campaigns": len(result["campaigns"]), "outputs_compared": compared, "outputs_differing": differ,
             "problems": problems, "cases": cases, "wall_s": round(time.monotonic() - t0, 1),
             "faults": result["faults"], "campaign_results": result["campaigns"]}
  with open(os.path.join(args.root, "faults.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"faults injected: {len(result['faults'])} ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))}); "
        f"exit codes after the fault: {', '.join(f'{k}: {v}' for k, v in sorted(exits.items()))}; "
        f"attempts {result['attempts']}; campaigns {len(result['campaigns'])}; cases "
        f"{sum(1 for c in cases if not c.get('skipped') and not c.get('problems'))}/{len(cases)} ok; "
        f"outputs compared {compared}; differing {differ}; problems {len(problems)}; {summary['wall_s']} s", flush=True)
  for p in problems:
    print("PROBLEM:", p[:3000], flush=True)
  return 1 if differ or problems else 0


if __name__ == "__main__":
  sys.exit(main())
