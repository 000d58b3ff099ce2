"""Moved to ``tools.torch_parity.self_spread``: ``python -m tools.torch_parity.self_spread`` from the repo root.

This old path (cited in the docs) works where the package is installed (``pip install -e .``).
"""

import runpy

runpy.run_module("tools.torch_parity.self_spread", run_name="__main__", alter_sys=True)
