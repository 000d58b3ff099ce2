"""Moved to ``tools.faults``: ``python -m tools.faults`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.faults", run_name="__main__", alter_sys=True)
