"""Test-session settings: faster XLA compilation, a shared compilation cache.

Compilation dominates these tests (a ResNet18 training step compiles in 10-20 s on two
cores, then runs in milliseconds at the tiny sizes used here). LLVM's expensive passes
are skipped and the backend optimises at level 0: only the generated code's speed
changes (measured on 2 cores, AMD EPYC Zen 3: a SLAM-AGS step's compile 23 -> 15 s of
CPU, tests/test_mil.py 99 -> 54 s of CPU; the float64 oracles still hold to their
tolerances). The persistent cache lives in a per-session folder that subprocess tests,
in-process tests and xdist workers share, removed at the end of the session (unless
SLAMAGS_JAX_CACHE was set by the caller; "off" turns it off).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")
if "SLAMAGS_JAX_CACHE" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="slamags-jax-test-cache-")
  os.environ["SLAMAGS_JAX_CACHE"] = _SESSION_CACHE
else:
  _SESSION_CACHE = None

import jax  # noqa: E402  (after XLA_FLAGS)

# In-process tests share compiled programs too: the same step compiled by two tests (or
# by two xdist workers) is compiled once.
if os.environ["SLAMAGS_JAX_CACHE"].lower() != "off":
  jax.config.update("jax_compilation_cache_dir", os.environ["SLAMAGS_JAX_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
