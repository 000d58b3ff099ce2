"""Moved to ``tools.studies.collapse``: ``python -m tools.studies.collapse`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.studies.collapse", run_name="__main__", alter_sys=True)
