"""Moved to ``tools.pbc_erb.sweep``: ``python -m tools.pbc_erb.sweep`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.pbc_erb.sweep", run_name="__main__", alter_sys=True)
