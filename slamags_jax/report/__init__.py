"""The report: metrics tables, figures, the cell gallery and the bag and slide reports.

Modules, one concern each (the lower ones import nothing from the stage):

- ``tables``: markdown tables and number formatting (``md_table``, ``fmt``, ``pm``).
- ``cells_csv``: the per-cell tables (``CSV_COLUMNS`` for simulated bags, the slides' columns).
- ``gallery``: the one thumbnail gallery (PIL) of the bag report, the slide report and ``predict``.
- ``figures``: matplotlib figures (attention, pretraining curves, ROC).
- ``bags``: the simulated-bags report (``evaluate``, summary, markdown).
- ``slides``: the slide report (``bags.source=slides``).
- ``stage``: the ``report`` stage (``run``).

The names below are loaded on first use, so that ``predict`` can import ``tables``,
``cells_csv`` and ``gallery`` without loading the stage or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> (module, attribute)
    "run": ("stage", "run"),
    "CSV_COLUMNS": ("cells_csv", "CSV_COLUMNS"),
    "write_cells_csv": ("cells_csv", "write_bag_cells_csv"),
    "REQUIRED_KEYS": ("bags", "REQUIRED_KEYS"),
    "evaluate": ("bags", "evaluate"),
    "markdown": ("bags", "markdown"),
    "attention_figure": ("figures", "attention_figure"),
    "pretrain_figure": ("figures", "pretrain_figure"),
    "roc_figure": ("figures", "roc_figure"),
    "png": ("figures", "png"),
    "_png": ("figures", "png"),
    "bag_gallery_png": ("gallery", "bag_gallery_png"),
    "THUMB_PX": ("gallery", "THUMB_PX"),
    "md_table": ("tables", "md_table"),
    "fmt": ("tables", "fmt"),
    "pm": ("tables", "pm"),
}
_MODULES = ("bags", "cells_csv", "figures", "gallery", "slides", "stage", "tables")

__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))
