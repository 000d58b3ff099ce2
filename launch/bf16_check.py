"""Moved to ``tools.studies.bf16_check``: ``python -m tools.studies.bf16_check`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.studies.bf16_check", run_name="__main__", alter_sys=True)
