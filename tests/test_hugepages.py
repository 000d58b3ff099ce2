"""Huge pages for malloc: when the entry points re-execute, with what, and that it works."""

import json
import os
import subprocess
import sys

import pytest

from slamags_jax.runtime import hugepages

GLIBC = (2, 36)


def test_environment_adds_the_tunable_only_where_it_takes_effect():
  new = hugepages.environment({"PATH": "/bin"}, GLIBC, "madvise")
  assert new == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  kept = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for env, glibc, mode in [({}, GLIBC, "always"), ({}, GLIBC, "never"), ({}, GLIBC, None),
                           ({}, (2, 34), "madvise"), ({}, None, "madvise"),
                           ({"SLAMAGS_JAX_HUGEPAGES": "0"}, GLIBC, "madvise"),
                           ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise")]:
    assert hugepages.environment(env, glibc, mode) is None, (env, glibc, mode)


def test_active():
  on = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert hugepages.active(on, GLIBC, "madvise")
  assert hugepages.active({}, GLIBC, "always")
  assert not hugepages.active({}, GLIBC, "madvise")
  assert not hugepages.active(on, GLIBC, "never")
  assert not hugepages.active(on, (2, 34), "madvise")
  assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise")


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


_CHILD = """
import ctypes, json, os, sys
from slamags_jax.runtime import hugepages
hugepages.reexec_if_useful()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
p = libc.malloc(n)  # 256 MB straight from malloc (numpy would madvise on its own)
ctypes.memset(p, 1, n)
huge_kb = 0
with open("/proc/self/smaps_rollup") as f:
  for line in f:
    if line.startswith("AnonHugePages:"):
      huge_kb = int(line.split()[1])
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "active": hugepages.active(), "huge_kb": huge_kb}))
"""


def _child(env):
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, "x", "--y=1"], env=env, stdout=subprocess.PIPE,
                          text=True)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  result = json.loads(out.strip().splitlines()[-1])
  assert result["pid"] == proc.pid  # re-executed in place, not a second process
  return result


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_reexec_gives_malloc_huge_pages_with_the_same_arguments():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.SWITCH)}
  would = hugepages.environment(env, hugepages.glibc_version(), hugepages.thp_mode()) is not None
  if not would:
    pytest.skip("huge pages for malloc would not take effect here (glibc or kernel THP mode)")
  on = _child(env)
  assert on["argv"] == ["x", "--y=1"] and on["tunables"] == "glibc.malloc.hugetlb=1" and on["active"]
  assert on["huge_kb"] >= 64 << 10, on  # the kernel backed the array with 2 MiB pages
  off = _child({**env, hugepages.SWITCH: "0"})
  assert off["tunables"] is None and not off["active"]
  assert off["huge_kb"] < on["huge_kb"]
