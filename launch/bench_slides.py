"""Moved to ``tools.bench_slides``: ``python -m tools.bench_slides`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.bench_slides", run_name="__main__", alter_sys=True)
