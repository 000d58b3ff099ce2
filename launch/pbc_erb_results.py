"""Moved to ``tools.pbc_erb.results``: ``python -m tools.pbc_erb.results`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.pbc_erb.results", run_name="__main__", alter_sys=True)
