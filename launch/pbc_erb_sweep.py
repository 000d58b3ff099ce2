r"""Resumable sweep of the PBC-ERB benchmark: (method x witness rate x seed) -> runs.csv.

  python launch/pbc_erb_sweep.py --methods slam_ags,weaksupcon,pcgrad,simclr,weakly,random \
      --witness-rates 0.1,0.05,0.02,0.01,0.005 --seeds 0,1,2
  python launch/pbc_erb_sweep.py --methods slam_ags --witness-rates 0.1 --seeds 0 --dry-run
  python launch/pbc_erb_sweep.py --selection results/pbc_erb/selection.json   # the benchmark (see below)

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
validation bags by ``launch/pbc_erb_select.py``; each method then runs with its own
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
import csv
import dataclasses
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable from a checkout without installing the package
  sys.path.insert(0, REPO)

from slamags_jax import config as config_lib  # noqa: E402
from slamags_jax.runtime import fileio  # noqa: E402
from slamags_jax import main as main_lib  # noqa: E402  (markers and operational keys; no jax)
from slamags_jax.runtime.errors import UserError  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "pbc_erb.py")
DEFAULT_CSV = os.path.join(REPO, "results", "pbc_erb", "runs.csv")
DEFAULT_ROOT = os.path.join(REPO, "workdirs", "pbc_erb")
METHODS = config_lib.METHODS
WITNESS_RATES = (0.1, 0.05, 0.02, 0.01, 0.005)

# Issue #9's columns, in this order; then the extras.
REQUIRED_COLUMNS = (
    "method", "witness_rate", "seed", "bag_f1", "bag_auc", "bag_accuracy", "topk_k", "topk_found_mean",
    "recall_at_k_mean", "retrieval_ap_mean", "final_effective_rank", "conflict_fraction", "mean_task_cosine",
    "pretrain_wall_s", "total_wall_s", "commit", "machine")
EXTRA_COLUMNS = (
    "settings_hash", "dirty", "stages_run", "invocations", "total_wall_s_all", "earlier_commits", "pretrain_steps",
    "random_recall_at_k_mean", "random_ap_mean", "mil_best_epoch", "finished_utc", "workdir",
    # Appended later (benchmark.md "Selection"; issue #15): validation-bag scores, the
    # collapse verdict. Columns only ever grow at the end: an older CSV gets the new header
    # and empty cells in its old rows on the next append (``migrate_header``).
    "val_bag_auc", "val_bag_f1", "val_recall_at_k_mean", "val_retrieval_ap_mean", "n_val_bags", "collapsed",
    "ntxent_over_chance", "final_head_effective_rank")
COLUMNS = REQUIRED_COLUMNS + EXTRA_COLUMNS
# Copied from report/summary.json as they are.
_REPORT_KEYS = ("bag_f1", "bag_auc", "bag_accuracy", "topk_k", "topk_found_mean", "recall_at_k_mean",
                "retrieval_ap_mean", "random_recall_at_k_mean", "random_ap_mean", "mil_best_epoch",
                "val_bag_auc", "val_bag_f1", "val_recall_at_k_mean", "val_retrieval_ap_mean", "n_val_bags")
_PRETRAIN_KEYS = ("final_effective_rank", "conflict_fraction", "mean_task_cosine", "final_head_effective_rank")

PER_RUN_KEYS = ("seed", "pretrain.method", "bags.witness_rate")  # set by the sweep for each run
STAGE_MARKERS = main_lib.MARKERS  # stage -> completion marker in a workdir
# Sources whose uncommitted changes make a run's code unrecorded.
CODE_PATHS = ("slamags_jax", "configs")


# ----------------------------------------------------------------------------- config and settings

def parse_set(items: Sequence[str]) -> list[tuple[str, str]]:
  """["a.b=1", ...] -> [("a.b", "1")]; per-run and stage keys are the sweep's own."""
  out = []
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
      raise UserError(f"--set expects key=value, got {item!r}")
    if key in PER_RUN_KEYS:
      raise UserError(f"--set {key}: the sweep sets it per run (use --methods, --witness-rates, --seeds)")
    if key == "stages":
      raise UserError("--set stages: a sweep row needs every stage")
    out.append((key, value))
  return out


def load_config(config_path: str, overrides: Sequence[tuple[str, str]] = ()) -> Any:
  """The config as main would build it from the same file and ``--config.<key>=<value>`` flags."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  argv = ["sweep", f"--config={config_path}", *[f"--config.{k}={v}" for k, v in overrides]]
  # sys_argv: the override flags are declared from the argv seen at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except Exception as e:  # a config that fails to load, an unknown key, a bad value
    raise UserError(" ".join(f"{type(e).__name__}: {e}".split())) from e
  cfg = fv["config"].value
  config_lib.validate(cfg)
  return cfg


def data_fingerprint(root: str) -> str:
  """The data folder's identity: its SHA256SUMS file (path-independent), else its path."""
  sums = os.path.join(root, "SHA256SUMS")
  if os.path.isfile(sums):
    with open(sums, "rb") as f:
      return "sha256sums:" + hashlib.sha256(f.read()).hexdigest()[:16]
  return "path:" + os.path.relpath(os.path.abspath(root), REPO)


def settings_of(cfg: Any) -> dict[str, Any]:
  """Every result-affecting config value except the per-run ones, plus the data identity."""
  out: dict[str, Any] = {}
  inactive = config_lib.inactive_keys(cfg)  # keys of the other bag source: hashes stay as they were
  for key, value in sorted(config_lib.flatten(cfg).items()):
    if key in main_lib.OPERATIONAL or key in PER_RUN_KEYS or key == "data.root" or key in inactive:  # how, not what
      continue
    out[key] = list(value) if isinstance(value, tuple) else value
  out["data.fingerprint"] = data_fingerprint(cfg.data.root)
  return out


def settings_hash(settings: dict[str, Any]) -> str:
  blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def settings_path(csv_path: str, digest: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(csv_path)), "settings", f"{digest}.json")


def write_settings(csv_path: str, digest: str, settings: dict[str, Any], config_path: str, cfg: Any,
                   overrides: Sequence[tuple[str, str]]) -> None:
  """Keeps the full settings of a hash beside the CSV (once; the content is fixed by the hash)."""
  path = settings_path(csv_path, digest)
  if os.path.exists(path):
    return
  fileio.write_json(path, {
      "settings_hash": digest, "settings": settings, "config": _rel(config_path),
      "overrides": [f"{k}={v}" for k, v in overrides],
      "data_root": _rel(cfg.data.root)})


def read_settings(csv_path: str, digest: str) -> dict[str, Any] | None:
  path = settings_path(csv_path, digest)
  try:
    return fileio.read_json(path)
  except (OSError, ValueError):
    return None


def _rel(path: str) -> str:
  path = os.path.abspath(path)
  rel = os.path.relpath(path, REPO)
  return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else path


# ----------------------------------------------------------------------------- provenance

def _git(*args: str) -> str:
  return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout


def git_state(config_path: str) -> tuple[str, list[str]]:
  """(HEAD commit, uncommitted paths among the code and config); ("unknown", [why]) without git."""
  try:
    commit = _git("rev-parse", "HEAD").strip()
    paths = list(CODE_PATHS)
    rel = os.path.relpath(os.path.abspath(config_path), REPO)
    if not rel.startswith(os.pardir):
      paths.append(rel)
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *paths)
  except (OSError, subprocess.CalledProcessError) as e:
    return "unknown", [f"(git unavailable: {e})"]
  return commit, [line[3:] for line in status.splitlines() if line.strip()]


def _cpu_model() -> str:
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"


def machine_description(python: str = sys.executable) -> str:
  """Platform, CPU model, usable cores, jax version and backend (asked in a child process)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  probe = "import jax; print(jax.__version__, jax.default_backend(), jax.device_count())"
  try:
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, timeout=120).stdout
    version, backend, n = out.split()[-3:]
    jax_part = f"jax {version} {backend} x{n}"
  except (OSError, subprocess.SubprocessError, ValueError):
    jax_part = "jax unknown"
  return f"{platform.system()} {platform.machine()}; {_cpu_model()}; {cores} cores; {jax_part}"


# ----------------------------------------------------------------------------- the CSV

def wr_key(witness_rate: float | str) -> str:
  """A witness rate as the CSV writes it and matches it: 0.1 -> "0.1", 0.005 -> "0.005"."""
  return format(float(witness_rate), ".6g")


def wr_dirname(witness_rate: float) -> str:
  return "wr" + format(100 * float(witness_rate), ".6g")  # 0.1 -> wr10, 0.005 -> wr0.5


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return str(int(value))
  if isinstance(value, float):
    return "" if not math.isfinite(value) else repr(value)
  return str(value)


def format_row(row: dict[str, Any]) -> str:
  """One CSV line (with its newline) holding ``COLUMNS`` in order; missing values empty."""
  unknown = set(row) - set(COLUMNS)
  if unknown:
    raise ValueError(f"not CSV columns: {sorted(unknown)}")
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in COLUMNS])
  return buf.getvalue()


def header_line() -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerow(COLUMNS)
  return buf.getvalue()


def read_rows(path: str, warn: Callable[[str], None] | None = None) -> list[dict[str, str]]:
  """The CSV's rows as dicts of strings; a torn or malformed line is skipped (with a warning)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", newline="") as f:
    records = list(csv.reader(f))
  if not records:
    return []
  header = records[0]
  if tuple(header[:len(REQUIRED_COLUMNS)]) != REQUIRED_COLUMNS:
    raise UserError(f"{path}: the header is not this sweep's columns ({','.join(REQUIRED_COLUMNS)},...)")
  rows = []
  for i, rec in enumerate(records[1:], start=2):
    if len(rec) != len(header):
      if warn and any(x.strip() for x in rec):
        warn(f"{path}:{i}: {len(rec)} fields instead of {len(header)} (a torn line?); ignored")
      continue
    rows.append(dict(zip(header, rec)))
  return rows


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
  """An exclusive flock on a folder (held while the CSV is read, extended and replaced)."""
  os.makedirs(folder, exist_ok=True)
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def append_row(path: str, row: dict[str, Any]) -> None:
  """Adds one row: old bytes + the new line, written atomically (fileio) under the folder lock.

  Rewriting rather than appending in place means a kill can never leave a torn line, and
  the earlier rows stay byte for byte as they were.
  """
  path = os.path.abspath(path)
  line = format_row(row)
  with folder_lock(os.path.dirname(path)):
    old = ""
    if os.path.exists(path):
      with open(path, encoding="utf-8", newline="") as f:
        old = f.read()
    if not old.strip():
      old = header_line()
    elif old.splitlines()[0] + "\n" != header_line():
      old = migrate_header(path, old)
    if not old.endswith("\n"):
      old += "\n"
    fileio.write_text(path, old + line)


def _header_fields(text: str) -> list[str]:
  return next(csv.reader(io.StringIO(text.splitlines()[0] + "\n")), [])


def _is_older_header(fields: Sequence[str]) -> bool:
  """An earlier version of ``COLUMNS``: a proper prefix of it (columns only grow at the end)."""
  return len(REQUIRED_COLUMNS) <= len(fields) < len(COLUMNS) and tuple(fields) == COLUMNS[:len(fields)]


def migrate_header(path: str, old: str) -> str:
  """The CSV text under today's header: each old row padded with empty cells, else ``UserError``."""
  fields = _header_fields(old)
  if not _is_older_header(fields):
    raise UserError(f"{path}: its header differs from this sweep's columns; write to a new --csv")
  pad = "," * (len(COLUMNS) - len(fields))
  lines = old.splitlines(keepends=True)
  body = [ln.rstrip("\r\n") + pad + "\n" for ln in lines[1:] if ln.strip()]
  return header_line() + "".join(body)


def check_header(path: str) -> None:
  """Refuses a CSV written with other columns before any run starts (its rows could not be extended)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", newline="") as f:
    first = f.readline()
  if first.strip() and first.rstrip("\r\n") + "\n" != header_line() and not _is_older_header(_header_fields(first)):
    raise UserError(f"{path}: its header differs from this sweep's columns; write to a new --csv")


def done_keys(rows: Sequence[dict[str, str]], digest: str, *, count_dirty: bool) -> set[tuple[str, str, int]]:
  """(method, witness rate, seed) of the rows recorded with these settings."""
  out = set()
  for r in rows:
    if r.get("settings_hash") != digest:
      continue
    if r.get("dirty", "0") not in ("", "0") and not count_dirty:
      continue
    with contextlib.suppress(ValueError, KeyError):
      out.add((r["method"], wr_key(r["witness_rate"]), int(r["seed"])))
  return out


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
    log.write(f"=== {_utc_now()} {' '.join(cmd)}\n")
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


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
      pretrain_steps=pre.get("steps"), finished_utc=_utc_now(), workdir=_rel(workdir))
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
    out(f"settings {digest}: {len(taken)} run(s) taken over from {_rel(reuse_path)}: {', '.join(taken)}")
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
  out(f"settings {digest}: {len(jobs)} runs asked, {len(result.skipped)} already in {_rel(csv_path)}, "
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
      out(f"{head}: running (log: {_rel(log_path)})")
      fileio.append_jsonl(inv_path, {"event": "start", "utc": _utc_now(), "commit": commit})
      rc, wall, t0 = None, 0.0, time.perf_counter()
      try:
        rc, wall = run_command(cmd, log_path)
      finally:  # an interrupted invocation (Ctrl-C, SIGTERM) is logged too, with its time so far
        stages_run = [s for s in before if os.path.exists(os.path.join(workdir, STAGE_MARKERS[s]))]
        fileio.append_jsonl(inv_path, {
            "event": "end", "utc": _utc_now(), "wall_s": round(wall if rc is not None else time.perf_counter() - t0, 3),
            "exit": rc if rc is not None else "interrupted", "commit": commit, "stages_run": stages_run})
      if rc != 0:
        out(f"{head}: FAILED (exit {rc} after {wall:.0f} s); last lines of its log:\n{_tail(log_path)}")
        result.failed.append(f"{job.label()} (exit {rc}; log {_rel(log_path)})")
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
  import pbc_erb_select as select_lib  # noqa: PLC0415  (it imports this module)
  sel = select_lib.load(selection)
  out = []
  for m in methods:
    chosen, recorded = select_lib.chosen_overrides(sel, m)
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
    sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
    return 2
  csv_path, root = os.path.abspath(args.csv), os.path.abspath(args.workdir_root)
  machine = "" if args.dry_run else machine_description(args.python)
  if args.dry_run and dirty_paths:
    print(f"warning: uncommitted changes (a real sweep needs --allow-dirty): {', '.join(dirty_paths[:10])}")
  if not args.dry_run:
    for _, over, cfg, settings, digest in groups:
      write_settings(csv_path, digest, settings, config_path, cfg, over)
    print(f"commit {commit}{' (dirty: rows marked dirty=1)' if dirty_paths else ''}; machine: {machine}")
  signal.signal(signal.SIGTERM, _interrupt)  # a killed sweep logs the interrupted run's invocation
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
    sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
    return 2
  except KeyboardInterrupt:
    sys.stderr.write("interrupted: re-run the same command to resume (completed stages are kept)\n")
    return 130
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
