"""What the PBC-ERB sweep, selection and results share: the runs table and the settings.

- the config and settings: ``load_config`` (``slamags_jax.config.load``), ``settings_of`` /
  ``settings_hash`` (every config value that changes a result, plus the data's identity) and the
  ``settings/<hash>.json`` files beside a table;
- provenance: ``git_state``, ``machine_description``;
- the CSV (``COLUMNS``): read, append atomically under a folder lock, migrate an older header;
- a selection record: ``load_selection``, ``chosen_overrides`` (written by ``tools.pbc_erb.select``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Callable, Iterator, Sequence

from slamags_jax import config as config_lib
from slamags_jax import pipeline
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError
from tools import REPO

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

PER_RUN_KEYS = ("seed", "pretrain.method", "bags.witness_rate")  # set by the sweep for each run
STAGE_MARKERS = pipeline.MARKERS  # stage -> completion marker in a workdir
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
  return config_lib.load(config_path, overrides)


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
    if key in pipeline.OPERATIONAL or key in PER_RUN_KEYS or key == "data.root" or key in inactive:  # how, not what
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
      "settings_hash": digest, "settings": settings, "config": rel(config_path),
      "overrides": [f"{k}={v}" for k, v in overrides],
      "data_root": rel(cfg.data.root)})


def read_settings(csv_path: str, digest: str) -> dict[str, Any] | None:
  path = settings_path(csv_path, digest)
  try:
    return fileio.read_json(path)
  except (OSError, ValueError):
    return None


def rel(path: str) -> str:
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


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- a selection record

def load_selection(path: str) -> dict[str, Any]:
  """A selection.json, checked enough for the sweep and the results script."""
  try:
    sel = fileio.read_json(path)
  except (OSError, ValueError) as e:
    raise UserError(f"selection {path} unreadable: {e}") from e
  if not isinstance(sel, dict) or not isinstance(sel.get("methods"), dict):
    raise UserError(f"selection {path} has no 'methods' record (write it with python -m tools.pbc_erb.select choose)")
  return sel


def chosen_overrides(sel: dict[str, Any], method: str) -> tuple[list[tuple[str, str]], str]:
  """(overrides, settings hash) chosen for a method, else ``UserError``."""
  rec = sel["methods"].get(method)
  if not rec or not rec.get("chosen"):
    raise UserError(f"the selection has no chosen setting for method {method!r}")
  return parse_set(rec["chosen"]), rec["settings_hash"]
