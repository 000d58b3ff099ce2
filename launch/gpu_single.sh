#!/usr/bin/env bash
# One GPU machine: the whole pipeline on every GPU of this host (one process, data-parallel).
#
# Runs:     python -m slamags_jax.main with CONFIG (default configs/paper.py: the Matek
#           bone-marrow cells, full-width ResNet18, 224 px, batch 256 split over the GPUs,
#           150 epochs of SLAM-AGS, then embedding, PAMIL and the report).
# Launch:   DATA_ROOT=/data/Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer \
#             WORKDIR=$HOME/workdirs/paper_slam_ags_wr10 bash launch/gpu_single.sh \
#             [--config.bags.witness_rate=0.01 --config.pretrain.method=weaksupcon ...]
#           (arguments are passed on to slamags_jax.main; the repo is this script's checkout).
# Produces: $WORKDIR/report/summary.json and report.md (bag F1 / AUC, top-400 retrieval,
#           galleries) and every stage's outputs under $WORKDIR; pretrain/summary.json
#           records "devices". Re-running the same command resumes a killed run.
#
# Environment (defaults):
#   CONFIG=configs/paper.py        config file, relative to the repo or absolute
#   WORKDIR=<repo>/workdirs/paper  a local (POSIX) folder
#   DATA_ROOT=                     the image folder (--config.data.root); empty: the config's
#   VENV=<repo>/.venv-gpu          virtualenv, created when missing
#   PYTHON=python3                 interpreter for a new virtualenv (JAX wants a recent Python)
#   JAX_SPEC=jax[cuda12]           JAX with its CUDA wheels (pip extra)
#   SKIP_INSTALL=0                 1: use VENV as it is
#   CUDA_VISIBLE_DEVICES           which GPUs (default: all of them)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/paper.py}"
WORKDIR="${WORKDIR:-$REPO/workdirs/paper}"
DATA_ROOT="${DATA_ROOT:-}"
VENV="${VENV:-$REPO/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
JAX_SPEC="${JAX_SPEC:-jax[cuda12]}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"

if [[ "$SKIP_INSTALL" != 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
  "$VENV/bin/pip" install -q -e "$REPO" "$JAX_SPEC"
fi

# Fail early, in one line, when JAX does not see a GPU (driver, CUDA wheels).
"$VENV/bin/python" - <<'EOF'
import sys
import jax
devices = jax.devices()
print(f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}", flush=True)
if jax.default_backend() != "gpu":
  sys.exit("error: JAX sees no GPU (check the NVIDIA driver and JAX_SPEC)")
EOF

args=(--config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "$DATA_ROOT" ]]; then
  args+=(--config.data.root="$DATA_ROOT")
fi
cd "$REPO"
exec "$VENV/bin/python" -m slamags_jax.main "${args[@]}" "$@"
