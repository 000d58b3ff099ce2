"""Test-session settings: faster XLA compilation, a private compilation cache.

Compilation dominates these tests (a ResNet18 training step compiles in 10-20 s on two
cores, then runs in milliseconds at the tiny sizes used here). LLVM's expensive passes
are skipped (numerics unchanged; only generated-code speed), and the persistent cache
lives in a per-session folder that subprocess tests share and that is removed at the end
of the session (unless SLAMAGS_JAX_CACHE was set by the caller).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true")
if "SLAMAGS_JAX_CACHE" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="slamags-jax-test-cache-")
  os.environ["SLAMAGS_JAX_CACHE"] = _SESSION_CACHE
else:
  _SESSION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
