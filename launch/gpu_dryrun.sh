#!/usr/bin/env bash
# Dry run of the GPU command on a CPU (issue 29): the GPU machine's Python, its versions, no network.
#
# Runs:     1. a stand-in of the GPU machine's Python: a Python 3.12 virtualenv VENV holding
#              what the GPU machine preinstalls of this project's needs, at its versions
#              (launch/gpu_machine.txt: jax/jaxlib 0.11.2, numpy 2.5.2, ...; jax for the CPU),
#              and none of what launch/gpu_wheels.sh carries (uninstalled if there);
#           2. GPU_COMMAND, the command of launch/README.md, from the repo root with that
#              virtualenv's python3 first on PATH, ALLOW_CPU=1 and small sizes: it installs
#              only the wheels of .whl with --no-index --no-deps and runs launch/gpu_check.sh.
# Launch:   bash launch/gpu_wheels.sh && bash launch/gpu_dryrun.sh
# Produces: $OUT/gpu_check.json and gpu_check.log (launch/gpu_check.sh), the stand-in's
#           package list in $OUT/standin.txt, and the wall time of the command.
#
# Environment (defaults):
#   PYTHON=python3.12                  interpreter for a new VENV
#   VENV=${TMPDIR:-/tmp}/slamags-gpu-standin   the stand-in (outside the repo)
#   OUT=<repo>/workdirs/gpu_dryrun     where gpu_check.sh writes
#   SKIP_STANDIN=0                     1: use VENV as it is
#   BENCH_TIMEOUT=300                  per bench: a busy CPU compiles slower than the GPU budget's 85 s allows
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.12}"
VENV="${VENV:-${TMPDIR:-/tmp}/slamags-gpu-standin}"
OUT="${OUT:-$REPO/workdirs/gpu_dryrun}"
SKIP_STANDIN="${SKIP_STANDIN:-0}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
# The command of launch/README.md ("The GPU check"), run as it is there.
GPU_COMMAND='WHEELS=.whl bash launch/gpu_check.sh'

cd "$REPO"
ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl (run launch/gpu_wheels.sh)" >&2; exit 2; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [[ "$SKIP_STANDIN" != 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version'
  # What the GPU machine has of the project's needs (and pytest), at its versions.
  "$VENV/bin/python" -m tools.gpu_reqs "$TMP" pytest pytest-xdist
  "$VENV/bin/python" -m pip install -q -r "$TMP/requirements.txt" -c "$TMP/constraints.txt"
  # Less what the wheels carry: the GPU machine does not have it.
  carried=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done)
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip uninstall -q -y $carried
fi
mkdir -p "$OUT"
"$VENV/bin/python" -m pip list --format=freeze >"$OUT/standin.txt"
# Anything the stand-in holds that the GPU machine's list does not name would hide a gap.
"$VENV/bin/python" -m tools.gpu_reqs "$TMP"
while IFS='=' read -r name _; do
  n=$(echo "$name" | tr 'A-Z_.' 'a-z--')
  grep -qx "$n" "$TMP/machine.txt" || [[ "$n" == pip ]] || echo "note: the stand-in has $name, not on the GPU machine's list"
done <"$OUT/standin.txt"

echo "+ $GPU_COMMAND   (python3: $VENV/bin/python3, ALLOW_CPU=1, small sizes)"
t0=$(date +%s)
rc=0
env PATH="$VENV/bin:$PATH" PYTHONPATH= OUT="$OUT" SITE="$TMP/site" ALLOW_CPU=1 BENCH_TIMEOUT="$BENCH_TIMEOUT" \
  SIZE=32 IMAGE=40 BATCH=8 WIDTH=8 STEPS=2 CELLS=32 WORKERS=0,2 INPUT_STEPS=2 \
  bash -c "$GPU_COMMAND" || rc=$?
echo "dry run: exit $rc in $(($(date +%s) - t0)) s; $OUT/gpu_check.json"
exit "$rc"
