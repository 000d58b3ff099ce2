#!/usr/bin/env bash
# constraints.txt from a tested environment (issue 29): what is tested is what installs.
#
# Runs:     in VENV (default: a new virtualenv outside the repo, installed with
#           `pip install -e ".[test]"`, i.e. the newest releases pyproject.toml's ranges allow),
#           launch/check_versions.sh (the fast test loop); only when it passes, writes
#           `pip freeze --exclude-editable` of VENV to constraints.txt under a header that says
#           how, when, on which Python and jax, and what passed. Then, with CHECK_PYTHON (a
#           Python 3.12), resolves `.[test]` under the new constraints there (pip --dry-run),
#           so that every pinned version also exists for the GPU machine's Python.
# Launch:   bash launch/freeze_constraints.sh
#           VENV=/path/to/tested/venv bash launch/freeze_constraints.sh
# Produces: constraints.txt (README's Quick start and .ci/run install with -c constraints.txt;
#           pyproject.toml keeps ranges).
#
# Environment (defaults):
#   PYTHON=python3           interpreter for a new VENV (the project's: 3.11 here)
#   VENV=                    an existing virtualenv to check and freeze; empty: a new one
#   CHECK_PYTHON=python3.12  second interpreter the pins must resolve on; empty: skip
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-}"
CHECK_PYTHON="${CHECK_PYTHON-python3.12}"
cd "$REPO"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [[ -z "$VENV" ]]; then
  VENV="$TMP/venv"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q -e ".[test]"
fi
PYTHON="$VENV/bin/python" bash launch/check_versions.sh | tee "$TMP/check.log"
[[ "${PIPESTATUS[0]}" == 0 ]] || { echo "error: the tests failed; constraints.txt left as it was" >&2; exit 1; }

"$VENV/bin/python" -m pip freeze --exclude-editable | sed 's/ @ .*//' >"$TMP/freeze.txt"
{
  echo "# Tested versions (generated: do not edit). Install with: pip install -e \".[test]\" -c constraints.txt"
  echo "# Written by \`bash launch/freeze_constraints.sh\` on $(date -u +%Y-%m-%d): pip freeze --exclude-editable"
  echo "# of a virtualenv with $("$VENV/bin/python" -c 'import platform, jax; print(f"Python {platform.python_version()}, jax {jax.__version__}")'),"
  echo "# after launch/check_versions.sh there: $(grep '^check_versions:' "$TMP/check.log" | sed 's/^check_versions: [^:]*: //')."
  echo "# pyproject.toml keeps ranges; the GPU machine's versions: launch/gpu_machine.txt."
  cat "$TMP/freeze.txt"
} >constraints.txt
echo "wrote constraints.txt: $(wc -l <"$TMP/freeze.txt") pins"

if [[ -n "$CHECK_PYTHON" ]]; then
  "$CHECK_PYTHON" -m pip install -q --dry-run --ignore-installed -e ".[test]" -c constraints.txt \
    || { echo "error: the pins do not resolve on $CHECK_PYTHON" >&2; exit 1; }
  echo "the pins resolve on $("$CHECK_PYTHON" -c 'import platform; print("Python", platform.python_version())')"
fi
