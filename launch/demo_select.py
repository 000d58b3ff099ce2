"""Moved to ``tools.studies.demo_select``: ``python -m tools.studies.demo_select`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.studies.demo_select", run_name="__main__", alter_sys=True)
