"""The experiments around the package: the PBC-ERB sweep, selection and results (``tools.pbc_erb``),
the studies (``tools.studies``), the fault injector, the folds runner and the slides benchmark.

Run them as modules from the repository root (``python -m tools.pbc_erb.sweep ...``) or, after
``pip install -e .``, through the old paths that the README and results cite
(``python launch/pbc_erb_sweep.py ...``: thin wrappers). They work on a checkout: ``REPO`` is
its root (configs, results, workdirs).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
