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

import jax

# In-process tests share compiled programs too: the same step compiled by two tests (or
# by two xdist workers) is compiled once.
if os.environ["SLAMAGS_JAX_CACHE"].lower() != "off":
  jax.config.update("jax_compilation_cache_dir", os.environ["SLAMAGS_JAX_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# The files that take longest, longest first (CPU seconds of `pytest --durations=0`, 2-core
# AMD EPYC). With `--dist loadfile` a file runs on one worker, and xdist hands files out in
# collection order (`--no-loadscope-reorder` in pyproject; its default orders by number
# of tests, which put the few-test, longest files last and left one worker alone at the
# end). Starting the longest first keeps both workers busy to the end. Files not listed
# follow in their usual order; a stale list costs only balance, never a test.
LONGEST_FIRST = (
    "test_parallel.py", "test_reliability.py", "test_pretrain.py", "test_pretrain_oracles.py",
    "test_surgery_properties.py", "test_mil.py", "test_bench.py", "test_predict.py", "test_surgery_pipeline.py",
    "test_device_augment.py", "test_models.py", "test_input_pipeline.py", "test_preemption.py", "test_report.py",
    "test_conv.py", "test_mil_models.py", "test_export.py", "test_ioerrors.py",
)


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
