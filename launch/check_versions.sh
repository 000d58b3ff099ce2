#!/usr/bin/env bash
# The fast test loop under a given Python (issue 29): one jax version per call.
#
# Runs:     pytest -n 0 on TESTS with PYTHON, from the repo root (the package from the tree,
#           PYTHONPATH); with WHEELS, first installs that folder's wheels with --no-index
#           --no-deps into a temporary folder put first on PYTHONPATH, as on the GPU machine.
# Launch:   bash launch/check_versions.sh                                 (.venv, jax 0.10)
#           PYTHON=/path/to/py312-standin/bin/python WHEELS=.whl bash launch/check_versions.sh
# Produces: one line "check_versions: python X, jax Y, flax Z: <pytest's closing line>", and
#           pytest's exit status.
#
# Environment (defaults):
#   PYTHON=<repo>/.venv/bin/python   interpreter whose packages are checked
#   WHEELS=                          optional folder of wheels to put on top (the GPU machine's way)
#   TESTS=-m "not e2e and not slow" test files or a pytest expression (default: the fast loop)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
WHEELS="${WHEELS:-}"
# The fast loop: every test but the end-to-end ones (no CLI subprocesses, no whole pipelines).
TESTS="${TESTS:--m not\ e2e\ and\ not\ slow}"
cd "$REPO"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [[ -n "$WHEELS" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" \
    "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$TMP/site"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
versions=$("$PYTHON" -c 'import platform, jax, flax; print(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}")') || exit 2
# shellcheck disable=SC2086
eval "\"\$PYTHON\" -m pytest -n 0 -p no:cacheprovider $TESTS" 2>&1 | tee "$TMP/log"
rc=${PIPESTATUS[0]}
echo "check_versions: $versions: $(grep -E '(passed|failed|error)' "$TMP/log" | tail -1)"
exit "$rc"
