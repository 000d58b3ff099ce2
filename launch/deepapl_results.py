"""Moved to ``tools.studies.deepapl``: ``python -m tools.studies.deepapl`` from the repo root.

This old path (cited in results/deepapl) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.studies.deepapl", run_name="__main__", alter_sys=True)
