"""Moved to ``tools.pbc_erb.select``: ``python -m tools.pbc_erb.select`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.pbc_erb.select", run_name="__main__", alter_sys=True)
