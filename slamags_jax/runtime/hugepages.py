"""Transparent huge pages for the host memory XLA:CPU allocates (Linux, glibc).

Why: XLA:CPU allocates a training step's activations and gradients with malloc. Large
blocks come from the kernel as fresh 4 KiB pages, each faulted in and zeroed on first
touch: about 250,000 page faults (1 GB) per step at 128 px on the benchmark CPU. glibc
(2.35+) has a tunable, ``glibc.malloc.hugetlb=1``, with which malloc asks the kernel
for transparent huge pages (2 MiB) for what it maps; with it the 128 px SLAM-AGS step
runs about 8 % faster (3081 -> 2830 ms median; docs/performance.md).

glibc reads tunables only when a process starts, so the command-line entry points
(``python -m slamags_jax.main`` and ``python -m slamags_jax.bench``) call
``reexec_if_useful()`` first: when the tunable would take effect and is not set, the
process re-executes itself once (same PID, same arguments) with it added to
``GLIBC_TUNABLES``. It would take effect on Linux with glibc 2.35+ where the kernel's
THP mode is "madvise" ("always" gives malloc huge pages already, "never" not at all).
``SLAMAGS_JAX_HUGEPAGES=0`` in the environment turns this off. Importing the package
never re-executes anything; library users who want the same set the variable themselves:
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py``.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SWITCH = "SLAMAGS_JAX_HUGEPAGES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (not glibc, or unknown)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, OSError, TypeError, ValueError):
    return None


def thp_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _tunable_value(env) -> str | None:
  for item in env.get("GLIBC_TUNABLES", "").split(":"):
    key, _, value = item.partition("=")
    if key == TUNABLE:
      return value
  return None


def _madvise_takes_effect(glibc: tuple[int, int] | None, mode: str | None) -> bool:
  """Whether malloc's madvise for huge pages is honoured: glibc 2.35+, THP mode "madvise"."""
  return mode == "madvise" and glibc is not None and glibc >= (2, 35)


def environment(env, glibc: tuple[int, int] | None, mode: str | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when re-executing would change nothing.

  Pure: ``env`` is the current environment, ``glibc`` and ``mode`` what
  ``glibc_version()`` and ``thp_mode()`` report.
  """
  if env.get(SWITCH, "1") == "0" or not _madvise_takes_effect(glibc, mode) or _tunable_value(env) is not None:
    return None
  new = dict(env)
  new["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1"]))
  return new


def active(env=None, glibc: tuple[int, int] | None = None, mode: str | None = None) -> bool:
  """Whether this process's malloc gets transparent huge pages (as far as one can tell)."""
  env = os.environ if env is None else env
  glibc = glibc_version() if glibc is None else glibc
  mode = thp_mode() if mode is None else mode
  if mode == "always":
    return True
  return _madvise_takes_effect(glibc, mode) and _tunable_value(env) in ("1", "2")


def reexec_if_useful() -> None:
  """Re-executes the running command with huge pages for malloc, if that would change
  anything (module docstring); otherwise, or if the exec fails, returns and the
  command runs on as it is. Call it first thing in a ``__main__`` block."""
  new_env = environment(os.environ, glibc_version(), thp_mode())
  if new_env is None:
    return
  args = [sys.executable, *sys.orig_argv[1:]]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, args, new_env)
  except OSError:
    return
