"""Moved to ``tools.torch_parity.check``: ``python -m tools.torch_parity.check`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.torch_parity.check", run_name="__main__", alter_sys=True)
