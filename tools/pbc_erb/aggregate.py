"""The PBC-ERB runs table's rows: which count (one settings hash, clean, the latest of each run), and
their aggregation per (method, witness rate) cell: mean, sample std and n over seeds; paired differences."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np

from tools.pbc_erb import common

METHOD_ORDER = common.METHODS  # slam_ags first


def pct(wr: float | str) -> str:
  return f"{100 * float(wr):g} %"


def to_float(text: Any) -> float:
  """A CSV cell as a float; empty or unparsable -> NaN."""
  try:
    return float(text)
  except (TypeError, ValueError):
    return math.nan


def select(rows: Sequence[dict[str, str]], digest: str | dict[str, str] | None,
           include_dirty: bool) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Rows of one settings hash (or of each method's chosen hash, a dict), clean unless asked,
  one per (method, WR, seed): the latest."""
  info: dict[str, Any] = {"other_hashes": Counter(), "dirty_left_out": 0, "duplicates": 0}
  latest: dict[tuple[str, str, int], dict[str, str]] = {}
  for r in rows:
    want = digest.get(r.get("method", "")) if isinstance(digest, dict) else digest
    if digest is not None and r.get("settings_hash") != want:
      info["other_hashes"][r.get("settings_hash", "")] += 1
      continue
    if r.get("dirty", "0") not in ("", "0") and not include_dirty:
      info["dirty_left_out"] += 1
      continue
    try:
      key = (r["method"], common.wr_key(r["witness_rate"]), int(r["seed"]))
    except (KeyError, ValueError):
      continue
    if key in latest:
      info["duplicates"] += 1
    latest[key] = r
  return list(latest.values()), info


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample std (ddof 1; NaN for one value), n) over the finite values."""
  v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else math.nan), int(v.size)


def cells(rows: Sequence[dict[str, str]]) -> dict[tuple[str, str], list[dict[str, str]]]:
  out: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
  for r in rows:
    out[(r["method"], common.wr_key(r["witness_rate"]))].append(r)
  return out


def aggregate(rows: Sequence[dict[str, str]], column: str) -> dict[tuple[str, str], tuple[float, float, int]]:
  """(method, WR) -> (mean, std, n) of one column."""
  return {k: mean_std([to_float(r.get(column)) for r in rs]) for k, rs in cells(rows).items()}


def methods_of(rows: Sequence[dict[str, str]]) -> list[str]:
  present = {r["method"] for r in rows}
  return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def wrs_of(rows: Sequence[dict[str, str]]) -> list[str]:
  """Witness rates present, falling (10 % first), as CSV keys."""
  return sorted({common.wr_key(r["witness_rate"]) for r in rows}, key=float, reverse=True)


def missing_cells(rows: Sequence[dict[str, str]], min_seeds: int, methods: Sequence[str] = METHOD_ORDER,
                  wrs: Sequence[float] = common.WITNESS_RATES) -> list[str]:
  """'method @ WR: n seeds' for each protocol cell with fewer than ``min_seeds`` seeds."""
  seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
  for r in rows:
    seeds[(r["method"], common.wr_key(r["witness_rate"]))].add(int(r["seed"]))
  out = []
  for m in methods:
    for w in wrs:
      n = len(seeds.get((m, common.wr_key(w)), ()))
      if n < min_seeds:
        out.append(f"{m} @ {pct(w)}: {n} seed{'s' if n != 1 else ''}")
  return out


def missing_by_method(missing: Sequence[str]) -> list[tuple[str, str]]:
  """[('pcgrad', '10 %: 0, 5 %: 1'), ...]: ``missing_cells`` grouped by method."""
  out = []
  for m in dict.fromkeys(c.split(" @ ", 1)[0] for c in missing):
    mine = [c.split(" @ ", 1)[1] for c in missing if c.split(" @ ", 1)[0] == m]
    out.append((m, ", ".join(c.replace(" seeds", "").replace(" seed", "") for c in mine)))
  return out


def paired_difference(rows: Sequence[dict[str, str]], column: str, a: str, b: str, wr: str) -> tuple[float, float, int]:
  """Mean and std over shared seeds of (a - b) at one witness rate: both saw the same bags."""
  by = {(r["method"], int(r["seed"])): to_float(r.get(column)) for r in rows if common.wr_key(r["witness_rate"]) == wr}
  seeds = sorted({s for (m, s) in by if m == a} & {s for (m, s) in by if m == b})
  return mean_std([by[(a, s)] - by[(b, s)] for s in seeds])
