"""Markdown tables and number formatting shared by the reports and ``predict``."""

from __future__ import annotations

import math
from typing import Any, Sequence


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table (every cell through ``str``), with a trailing newline."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def fmt(x: Any, digits: int = 3) -> str:
  """``n/a`` for None and non-finite floats, floats to ``digits`` places, anything else ``str``."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def pm(mean: float, std: float, digits: int = 3) -> str:
  """``mean ± std`` (``mean`` alone for a non-finite std, ``n/a`` for a non-finite mean)."""
  if not math.isfinite(mean):
    return "n/a"
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def found(x: float) -> str:
  """A count of witnesses found: an integer when whole (ties at the K-th place count fractionally)."""
  return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def slide_rows(slides: Sequence[dict[str, Any]], labels: Sequence[str], with_truth: bool) -> list[list[Any]]:
  """Rows ``slide, cells[, label], called, p(label)...`` of the slides table."""
  return [[s["id"], len(s["attention"])] + ([labels[int(s["label"])]] if with_truth else [])
          + [labels[int(s["pred"])]] + [f"{float(p):.3f}" for p in s["probs"]] for s in slides]
