"""Test-session settings: faster XLA compilation, a private compilation cache.

Compilation dominates these tests (a ResNet18 training step compiles in 10-20 s on two
cores, then runs in milliseconds at the tiny sizes used here). LLVM's expensive passes
are skipped (numerics unchanged; only generated-code speed), and the persistent cache
lives in a per-session folder that subprocess tests share.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("SLAMAGS_JAX_CACHE", tempfile.mkdtemp(prefix="slamags-jax-test-cache-"))
