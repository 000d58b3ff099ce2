#!/usr/bin/env bash
# Wheels for the GPU machine (issue 29): what it lacks of this project's dependencies.
#
# The GPU machine (launch/gpu_machine.txt: Python 3.12, jax 0.11.2 with its CUDA plugin,
# flax, optax, orbax-checkpoint, ...) cannot fetch anything, so what it lacks (grain,
# tensorflow-datasets, array-record, ml-collections and what they need that it lacks)
# travels with the working tree as wheels in the git-ignored folder .whl/.
# Runs:     resolves pyproject.toml's dependencies for Python 3.12 on this machine (pip
#           --dry-run --report, with the versions of constraints.txt for what the GPU machine
#           lacks and the GPU machine's own versions for what it has), keeps the packages that
#           launch/gpu_machine.txt does not name, and downloads each as a cp312 manylinux
#           x86_64 (or pure-Python) wheel with --no-deps: one version of each. A package
#           published only as a source archive (promise) is built into a wheel here, and must
#           come out pure Python (py3-none-any).
# Launch:   bash launch/gpu_wheels.sh                   (from a checkout, network to PyPI)
#           PYTHON=/path/to/python3.12 bash launch/gpu_wheels.sh
# Produces: .whl/*.whl (emptied first), a line per wheel and their total size; fails when the
#           total exceeds LIMIT_MIB, when a name has two versions or a wheel is missing.
# On the GPU machine: WHEELS=.whl bash launch/gpu_check.sh (launch/README.md has the command).
#
# Environment (defaults):
#   PYTHON=python3.12           a Python 3.12 interpreter with pip (resolves environment markers)
#   DEST=<repo>/.whl            output folder (git-ignored)
# Reads launch/gpu_machine.txt (what the GPU machine has) and constraints.txt (the tested
# versions, launch/freeze_constraints.sh) through tools/gpu_reqs.py.
#   LIMIT_MIB=32                fail above this total (the working tree may carry 64 MiB)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.12}"
DEST="${DEST:-$REPO/.whl}"
LIMIT_MIB="${LIMIT_MIB:-32}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "error: PYTHON=$PYTHON is not Python 3.12 (the GPU machine's)" >&2; exit 2; }

# Requirements (pyproject's dependencies) and constraints for the resolution.
(cd "$REPO" && "$PYTHON" -m tools.gpu_reqs "$TMP")

"$PYTHON" -m pip install -q --dry-run --ignore-installed --report "$TMP/report.json" \
  -r "$TMP/requirements.txt" -c "$TMP/constraints.txt"

# NAME==VERSION for each resolved package the GPU machine lacks.
"$PYTHON" - "$TMP" >"$TMP/carry.txt" <<'EOF'
import json, re, sys
tmp = sys.argv[1]
have = set(open(f"{tmp}/machine.txt").read().split())
for item in json.load(open(f"{tmp}/report.json"))["install"]:
  name, version = item["metadata"]["name"], item["metadata"]["version"]
  if re.sub(r"[-_.]+", "-", name.lower()) not in have:
    print(f"{name}=={version}")
EOF

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 \
         manylinux2010 manylinux_2_5 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
while read -r req; do
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$req" 2>"$TMP/err"; then
    # No wheel published: build one here; only a pure-Python one runs anywhere.
    "$PYTHON" -m pip wheel -q --no-deps -w "$TMP/built" "$req"
    for w in "$TMP"/built/*.whl; do
      [[ "$w" == *-none-any.whl ]] || { echo "error: $req built as $(basename "$w"), not pure Python" >&2; exit 1; }
      mv "$w" "$DEST/"
    done
  fi
done <"$TMP/carry.txt"

"$PYTHON" - "$DEST" "$TMP/carry.txt" "$LIMIT_MIB" <<'EOF'
import os, re, sys
dest, carry, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())
wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
names = [norm(w.split("-")[0]) for w in wheels]
wanted = {norm(r.split("==")[0]) for r in open(carry).read().split()}
dup = {n for n in names if names.count(n) > 1}
missing = wanted - set(names)
total = 0
for w in wheels:
  size = os.path.getsize(os.path.join(dest, w))
  total += size
  print(f"{size / 2**20:8.2f} MiB  {w}")
print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB in {dest}")
if dup or missing or total > limit * 2**20:
  sys.exit(f"error: two versions of {sorted(dup)}, missing {sorted(missing)}, or over {limit} MiB")
EOF
