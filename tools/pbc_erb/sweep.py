r"""Resumable sweep of the PBC-ERB benchmark: (method x witness rate x seed) -> runs.csv.

  python -m tools.pbc_erb.sweep --methods slam_ags,weaksupcon,pcgrad,simclr,weakly,random \
      --witness-rates 0.1,0.05,0.02,0.01,0.005 --seeds 0,1,2
  python -m tools.pbc_erb.sweep --methods slam_ags --witness-rates 0.1 --seeds 0 --dry-run
  python -m tools.pbc_erb.sweep --selection results/pbc_erb/selection.json   # the benchmark (see below)

(``python launch/pbc_erb_sweep.py ...`` is the same command.)

Each run is one subprocess, ``python -m slamags_jax.main --config=<config>
--workdir=<root>/<hash>/<method>/wr<percent>/seed<seed> --config.pretrain.method=...
--config.bags.witness_rate=... --config.seed=... [--config.<key>=<value> for --set]``,
with its output appended to ``<workdir>/sweep.log``. A finished run appends exactly one
row to the CSV (``COLUMNS``: the required columns of issue #9 in order, then extras).

Resuming: a (method, witness rate, seed) already in the CSV with the same settings hash
is skipped. A killed sweep is resumed by re-running the same command: the interrupted
run's workdir still holds its completed stages (skipped by main) and its pretraining
checkpoint (resumed), so only the missing work is done.

Selection (benchmark.md): ``--selection`` takes the per-method settings chosen on the
validation bags by ``tools.pbc_erb.select``; each method then runs with its own
overrides, under its own settings hash (checked against the one the selection recorded).
``--reuse-from results/pbc_erb/selection.csv`` copies the selection's runs of the chosen
settings (seed 0 at WR 1 % and 10 %) instead of running them again: same settings hash,
same bags, the same run.

Settings: ``settings_hash`` fingerprints every config value that changes a result (all
keys except the per-run ones -- seed, method, witness rate -- and main's operational
keys), plus the data folder's identity (its ``SHA256SUMS``; the folder's path does not
count). Rows recorded with other settings never count as done, and the workdirs live
under ``<root>/<hash>/`` so that a new setting never collides with an old workdir (main
would refuse it). The full settings of each hash are kept beside the CSV in
``settings/<hash>.json``; the results script reports one hash at a time.

Provenance: ``commit`` is ``git rev-parse HEAD``. The sweep refuses to start when
``slamags_jax/``, ``configs/`` or the config file have uncommitted changes (untracked
files there included), so every row comes from committed code; ``--allow-dirty`` (for
development) runs anyway and marks the rows ``dirty=1``. Dirty rows do not count as
done for a clean sweep, and the results script leaves them out unless asked.

Wall time: ``total_wall_s`` is the wall time of the final invocation, which ran the
stages named in ``stages_run`` (all five for an uninterrupted run). ``invocations``
counts every invocation that started in the workdir (logged in
``<workdir>/sweep_invocations.jsonl``), and ``total_wall_s_all`` sums the wall time of
those that ended, failed or interrupted (Ctrl-C, SIGTERM) ones included; only a
SIGKILLed invocation's time is missing from it. ``pretrain_wall_s`` is pretraining's own
total over its resumptions. A run resumed across commits names the earlier ones in
``earlier_commits`` (empty normally); the results script flags such rows.

The CSV is rewritten atomically (old bytes + the new line, through ``fileio``) under an
exclusive lock on its folder: a kill leaves either the old or the new file, and two
sweeps on one CSV never lose each other's rows. A per-workdir lock keeps two sweeps from
running the same cell at once. Each workdir builds its own bags (deterministic, ~5 s on
PBC-ERB): methods of one (witness rate, seed) see identical bags without sharing files.

A failing run is logged (the tail of its log is printed), records nothing, and the sweep
goes on; the exit status is 1 when any run failed, 2 on bad arguments or a dirty tree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from slamags_jax import app
from slamags_jax import config as config_lib
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError
from tools import REPO
from tools.pbc_erb.common import (  # noqa: F401  (COLUMNS ... parse_set: the sweep's interface, re-exported)
  COLUMNS,
  DEFAULT_CONFIG,
  DEFAULT_CSV,
  DEFAULT_ROOT,
  METHODS,
  REQUIRED_COLUMNS,
  STAGE_MARKERS,
  WITNESS_RATES,
  append_row,
  check_header,
  chosen_overrides,
  done_keys,
  git_state,
  load_config,
  load_selection,
  machine_description,
  parse_set,
  read_rows,
  read_settings,
  rel,
  settings_hash,
  settings_of,
  utc_now,
  wr_dirname,
  wr_key,
  write_settings,
)

# Copied from report/summary.json as they are.
_REPORT_KEYS = ("bag_f1", "bag_auc", "bag_accuracy", "topk_k", "topk_found_mean", "recall_at_k_mean",
                "retrieval_ap_mean", "random_recall_at_k_mean", "random_ap_mean", "mil_best_epoch",
                "val_bag_auc", "val_bag_f1", "val_recall_at_k_mean", "val_retrieval_ap_mean", "n_val_bags")
_PRETRAIN_KEYS = ("final_effective_rank", "conflict_fraction", "mean_task_cosine", "final_head_effective_rank")


# ----------------------------------------------------------------------------- one run

@dataclasses.dataclass(frozen=True)
class Job:
  method: str
  witness_rate: float
  seed: int

  @property
  def key(self) -> tuple[str, str, int]:
    return (self.method, wr_key(self.witness_rate), self.seed)

  def label(self) -> str:
    return f"{self.method} wr={100 * self.witness_rate:g}% seed={self.seed}"


def workdir_of(root: str, digest: str, job: Job) -> str:
  return os.path.join(root, digest, job.method, wr_dirname(job.witness_rate), f"seed{job.seed}")


def command_of(python: str, config_path: str, workdir: str, job: Job,
               overrides: Sequence[tuple[str, str]]) -> list[str]:
  return [python, "-m", "slamags_jax.main", f"--config={config_path}", f"--workdir={workdir}",
          f"--config.pretrain.method={job.method}", f"--config.bags.witness_rate={wr_key(job.witness_rate)}",
          f"--config.seed={job.seed}", *[f"--config.{k}={v}" for k, v in overrides]]


def run_command(cmd: Sequence[str], log_path: str) -> tuple[int, float]:
  """Runs ``cmd`` in the repo root with stdout and stderr appended to ``log_path``: (status, wall s)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"=== {utc_now()} {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    rc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    wall = time.perf_counter() - t0
    log.write(f"=== exit {rc} after {wall:.1f} s\n")
  return rc, wall


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[bool]:
  """Yields False when another sweep holds this workdir (then the run is left to it)."""
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    yield True
  finally:
    os.close(fd)


def _tail(path: str, n: int = 20) -> str:
  with contextlib.suppress(OSError):
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-n:])
  return ""


def build_row(job: Job, workdir: str, *, digest: str, commit: str, dirty: bool, machine: str,
              wall_s: float, stages_run: Sequence[str], invocations: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The CSV row of a finished run, from its summaries; raises ``UserError`` if they do not fit."""
  try:
    report = fileio.read_json(os.path.join(workdir, "report", "summary.json"))
    pre = fileio.read_json(os.path.join(workdir, "pretrain", "summary.json"))
  except (OSError, ValueError) as e:
    raise UserError(f"summaries of {workdir} unreadable: {e}") from e
  got = (report.get("method"), wr_key(report.get("witness_rate", "nan")), report.get("seed"))
  if got != job.key:
    raise UserError(f"{workdir}/report/summary.json is for {got}, not {job.key}")
  row: dict[str, Any] = {"method": job.method, "witness_rate": wr_key(job.witness_rate), "seed": job.seed}
  for k in _REPORT_KEYS:
    row[k] = report.get(k)
  for k in _PRETRAIN_KEYS:
    row[k] = pre.get(k)
  if "collapsed" in pre:
    row["collapsed"] = int(bool(pre["collapsed"]))
    row["ntxent_over_chance"] = (pre.get("collapse") or {}).get("ntxent_over_chance")
  ends = [i for i in invocations if i.get("event", "end") == "end"]
  starts = sum(1 for i in invocations if i.get("event") == "start")
  row.update(
      pretrain_wall_s=pre.get("wall_s"), total_wall_s=round(wall_s, 3), commit=commit, machine=machine,
      settings_hash=digest, dirty=int(dirty), stages_run=",".join(stages_run), invocations=max(starts, len(ends)),
      total_wall_s_all=round(sum(float(i.get("wall_s", 0.0)) for i in ends), 3),
      earlier_commits=";".join(sorted({str(i["commit"]) for i in invocations if i.get("commit", commit) != commit})),
      pretrain_steps=pre.get("steps"), finished_utc=utc_now(), workdir=rel(workdir))
  if row["bag_f1"] is None or row["recall_at_k_mean"] is None:
    raise UserError(f"{workdir}/report/summary.json lacks bag_f1 or recall_at_k_mean")
  return row


# ----------------------------------------------------------------------------- the sweep

@dataclasses.dataclass
class Outcome:
  ran: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  busy: list[str] = dataclasses.field(default_factory=list)
  failed: list[str] = dataclasses.field(default_factory=list)


def plan(methods: Sequence[str], witness_rates: Sequence[float], seeds: Sequence[int]) -> list[Job]:
  """Seed-major order: every (method, WR) gets a first seed before any gets a second."""
  return list(dict.fromkeys(Job(m, w, s) for s in seeds for w in witness_rates for m in methods))


def take_over(jobs: Sequence[Job], *, csv_path: str, reuse_path: str, digest: str, dry_run: bool,
              out: Callable[[str], None] = print) -> list[str]:
  """Copies into ``csv_path`` the clean rows of ``reuse_path`` (e.g. selection.csv) for jobs it lacks.

  A row there with the same (method, witness rate, seed) and settings hash is the same
  run (same config values, data and bags): the selection's seed-0 runs of the chosen
  settings need not run again. Returns the labels of the jobs taken over.
  """
  warn = lambda m: out(f"warning: {m}")  # noqa: E731
  done = done_keys(read_rows(csv_path, warn), digest, count_dirty=False)
  latest = {}
  for r in read_rows(reuse_path, warn):
    if r.get("settings_hash") == digest and r.get("dirty", "0") in ("", "0"):
      with contextlib.suppress(ValueError, KeyError):
        latest[(r["method"], wr_key(r["witness_rate"]), int(r["seed"]))] = r
  taken = []
  for job in jobs:
    row = latest.get(job.key)
    if row is None or job.key in done:
      continue
    if not dry_run:
      append_row(csv_path, {c: row.get(c, "") for c in COLUMNS})
    taken.append(job.label())
  if taken:
    out(f"settings {digest}: {len(taken)} run(s) taken over from {rel(reuse_path)}: {', '.join(taken)}")
  return taken


def sweep(jobs: Sequence[Job], *, config_path: str, overrides: Sequence[tuple[str, str]], csv_path: str,
          root: str, digest: str, commit: str, dirty: bool, machine: str, python: str = sys.executable,
          dry_run: bool = False, out: Callable[[str], None] = print) -> Outcome:
  """Runs the jobs not yet recorded; one CSV row per finished run."""
  result = Outcome()
  warn = lambda m: out(f"warning: {m}")  # noqa: E731
  check_header(csv_path)
  done = done_keys(read_rows(csv_path, warn), digest, count_dirty=dirty)
  todo = [j for j in jobs if j.key not in done]
  result.skipped = [j.label() for j in jobs if j.key in done]
  out(f"settings {digest}: {len(jobs)} runs asked, {len(result.skipped)} already in {rel(csv_path)}, "
      f"{len(todo)} to run")
  for i, job in enumerate(todo, start=1):
    workdir = workdir_of(root, digest, job)
    cmd = command_of(python, config_path, workdir, job, overrides)
    head = f"[{i}/{len(todo)}] {job.label()}"
    if dry_run:
      out(f"{head}: would run {' '.join(cmd)}")
      continue
    with workdir_lock(workdir) as mine:
      if not mine:
        out(f"{head}: another sweep is running it; left to that one")
        result.busy.append(job.label())
        continue
      if job.key in done_keys(read_rows(csv_path, warn), digest, count_dirty=dirty):
        out(f"{head}: recorded meanwhile by another sweep; skipped")
        result.skipped.append(job.label())
        continue
      before = [s for s, m in STAGE_MARKERS.items() if not os.path.exists(os.path.join(workdir, m))]
      log_path = os.path.join(workdir, "sweep.log")
      inv_path = os.path.join(workdir, "sweep_invocations.jsonl")
      out(f"{head}: running (log: {rel(log_path)})")
      fileio.append_jsonl(inv_path, {"event": "start", "utc": utc_now(), "commit": commit})
      rc, wall, t0 = None, 0.0, time.perf_counter()
      try:
        rc, wall = run_command(cmd, log_path)
      finally:  # an interrupted invocation (Ctrl-C, SIGTERM) is logged too, with its time so far
        stages_run = [s for s in before if os.path.exists(os.path.join(workdir, STAGE_MARKERS[s]))]
        fileio.append_jsonl(inv_path, {
            "event": "end", "utc": utc_now(), "wall_s": round(wall if rc is not None else time.perf_counter() - t0, 3),
            "exit": rc if rc is not None else "interrupted", "commit": commit, "stages_run": stages_run})
      if rc != 0:
        out(f"{head}: FAILED (exit {rc} after {wall:.0f} s); last lines of its log:\n{_tail(log_path)}")
        result.failed.append(f"{job.label()} (exit {rc}; log {rel(log_path)})")
        continue
      try:
        row = build_row(job, workdir, digest=digest, commit=commit, dirty=dirty, machine=machine, wall_s=wall,
                        stages_run=stages_run, invocations=fileio.read_jsonl(inv_path))
        append_row(csv_path, row)
      except UserError as e:
        out(f"{head}: FAILED: {e}")
        result.failed.append(f"{job.label()} ({e})")
        continue
      out(f"{head}: done in {wall:.0f} s (bag F1 {float(row['bag_f1']):.3f}, "
          f"recall@{row['topk_k']} {float(row['recall_at_k_mean']):.3f})")
      result.ran.append(job.label())
  return result


def _floats(text: str) -> list[float]:
  out = []
  for item in config_lib.split_csv(text):
    value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
    if not 0 < value <= 1:
      raise UserError(f"witness rate {item!r} is not in (0, 1] (write 0.05 or 5%)")
    out.append(value)
  return out


def _interrupt(signum: int, frame: Any) -> None:
  raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: every method)")
  p.add_argument("--witness-rates", default=",".join(map(str, WITNESS_RATES)),
                 help="comma list of fractions or percentages, e.g. 0.1,0.05 or 10%%,5%% (default: the five)")
  p.add_argument("--seeds", default="0,1,2", help="comma list (default: 0,1,2)")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: configs/pbc_erb.py)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, as --config.KEY=VALUE (repeatable); it changes the settings hash "
                      "unless the key is operational")
  p.add_argument("--selection", default="", metavar="JSON",
                 help="per-method settings chosen by launch/pbc_erb_select.py (e.g. results/pbc_erb/selection.json): "
                      "each method runs with its chosen overrides on top of --set")
  p.add_argument("--reuse-from", default="", metavar="CSV",
                 help="another runs table (e.g. results/pbc_erb/selection.csv) whose clean rows of the same settings "
                      "count as done here: they are copied into --csv instead of run again")
  p.add_argument("--csv", default=DEFAULT_CSV, help="runs table (default: results/pbc_erb/runs.csv)")
  p.add_argument("--workdir-root", default=DEFAULT_ROOT, help="workdirs go to <root>/<hash>/<method>/wr<%%>/seed<s> "
                                                              "(default: workdirs/pbc_erb)")
  p.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
  p.add_argument("--allow-dirty", action="store_true", help="run with uncommitted code; rows get dirty=1")
  p.add_argument("--dry-run", action="store_true", help="print what would run; run and write nothing")
  return p.parse_args(argv)


def _groups(methods: Sequence[str], config_path: str, overrides: Sequence[tuple[str, str]],
            selection: str) -> list[tuple[list[str], list[tuple[str, str]], Any, dict[str, Any], str]]:
  """(methods, overrides, cfg, settings, digest) per settings hash: one group, or one per method with a selection."""
  if not selection:
    cfg = load_config(config_path, overrides)
    settings = settings_of(cfg)
    return [(list(methods), list(overrides), cfg, settings, settings_hash(settings))]
  sel = load_selection(selection)
  out = []
  for m in methods:
    chosen, recorded = chosen_overrides(sel, m)
    over = list(overrides) + chosen
    cfg = load_config(config_path, over)
    settings = settings_of(cfg)
    digest = settings_hash(settings)
    if not overrides and digest != recorded:
      raise UserError(f"method {m}: the selection was made with settings {recorded}, the config and the chosen "
                      f"{' '.join(f'{k}={v}' for k, v in chosen)} give {digest} now (the settings changed since: "
                      "run the selection again)")
    out.append(([m], over, cfg, settings, digest))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    methods = config_lib.split_csv(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
      raise UserError(f"unknown method {bad[0] if bad else '(none)'}; methods are {','.join(METHODS)}")
    witness_rates = _floats(args.witness_rates)
    seeds = [int(s) for s in config_lib.split_csv(args.seeds)]
    if not witness_rates or not seeds or min(seeds) < 0:
      raise UserError("need at least one witness rate and one non-negative seed")
    config_path = os.path.abspath(args.config)
    overrides = parse_set(args.set)
    groups = _groups(methods, config_path, overrides, args.selection)
    commit, dirty_paths = git_state(config_path)
    if dirty_paths and not args.allow_dirty and not args.dry_run:
      raise UserError("uncommitted changes in the code or config (results must come from committed code; "
                      "--allow-dirty marks the rows dirty=1): " + ", ".join(dirty_paths[:10]))
  except (UserError, ValueError) as e:
    sys.stderr.write(app.error_line(e))
    return 2
  csv_path, root = os.path.abspath(args.csv), os.path.abspath(args.workdir_root)
  machine = "" if args.dry_run else machine_description(args.python)
  if args.dry_run and dirty_paths:
    print(f"warning: uncommitted changes (a real sweep needs --allow-dirty): {', '.join(dirty_paths[:10])}")
  if not args.dry_run:
    for _, over, cfg, settings, digest in groups:
      write_settings(csv_path, digest, settings, config_path, cfg, over)
    print(f"commit {commit}{' (dirty: rows marked dirty=1)' if dirty_paths else ''}; machine: {machine}")
  previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed sweep logs the interrupted run's invocation
  result, n_jobs = Outcome(), 0
  try:
    # With a selection, seed-major order still holds across methods: one seed of every cell first.
    for seed_group in ([seeds] if len(groups) == 1 else [[s] for s in seeds]):
      for group_methods, over, _, _, digest in groups:
        jobs = plan(group_methods, witness_rates, seed_group)
        n_jobs += len(jobs)
        if args.reuse_from and not dirty_paths:
          check_header(csv_path)
          take_over(jobs, csv_path=csv_path, reuse_path=os.path.abspath(args.reuse_from), digest=digest,
                    dry_run=args.dry_run)
        r = sweep(jobs, config_path=config_path, overrides=over, csv_path=csv_path, root=root, digest=digest,
                  commit=commit, dirty=bool(dirty_paths), machine=machine, python=args.python,
                  dry_run=args.dry_run)
        for field in dataclasses.fields(Outcome):
          getattr(result, field.name).extend(getattr(r, field.name))
  except UserError as e:
    sys.stderr.write(app.error_line(e))
    return 2
  except KeyboardInterrupt:
    sys.stderr.write("interrupted: re-run the same command to resume (completed stages are kept)\n")
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  if args.dry_run:
    print(f"dry run: {n_jobs - len(result.skipped)} would run, {len(result.skipped)} already recorded")
    return 0
  print(f"sweep: {len(result.ran)} ran, {len(result.skipped)} already recorded, {len(result.busy)} left to "
        f"another sweep, {len(result.failed)} failed")
  for f in result.failed:
    print(f"  failed: {f}")
  return 1 if result.failed else 0


if __name__ == "__main__":
  sys.exit(main())
