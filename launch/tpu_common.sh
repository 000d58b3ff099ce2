#!/usr/bin/env bash
# Shared by tpu_vm.sh and tpu_multihost.sh (sourced, not run): the defaults of the settings
# both scripts document, and gcloud helpers for a TPU VM or slice. The sourcing script
# sets REPO_DIR, TPU_NAME and ACCELERATOR_TYPE (their defaults differ) before sourcing.

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:-europe-west4-b}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
SPOT="${SPOT:-0}"
REPO="${REPO:-}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/paper.py}"
RUN_NAME="${RUN_NAME:-paper}"
DATA_GCS="${DATA_GCS:-}"
DATA_ROOT="${DATA_ROOT:-\$HOME/data/cells}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"

if [[ -z "$PROJECT" ]]; then
  echo "error: set PROJECT (or gcloud config set project ...)" >&2
  exit 2
fi

GCLOUD_TPU=(--zone="$ZONE" --project="$PROJECT")

on_workers() {  # on_workers WORKER COMMAND: run a bash command on the VM's workers
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_TPU[@]}" --worker="$1" --command="$2"
}

create() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_TPU[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
}

ship_checkout() {  # this checkout's tracked and untracked-but-not-ignored files -> ~/slamags-src.tgz on every worker
  local tmp list tgz
  tmp="$(mktemp -d)" && list="$tmp/files" && tgz="$tmp/slamags-src.tgz"
  git -C "$REPO_DIR" ls-files --cached --others --exclude-standard | while IFS= read -r f; do
    if [[ -e "$REPO_DIR/$f" ]]; then printf '%s\n' "$f"; fi
  done > "$list"
  tar -czf "$tgz" -C "$REPO_DIR" -T "$list"
  gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME":slamags-src.tgz "${GCLOUD_TPU[@]}" --worker=all
  rm -rf "$tmp"
}

install_script() {  # code (REPO@BRANCH, or the shipped checkout) and a virtualenv with jax[tpu], on a worker
  local get_code
  if [[ -n "$REPO" ]]; then
    get_code="if [ -d ~/slamags-jax/.git ]; then git -C ~/slamags-jax fetch -q origin && git -C ~/slamags-jax checkout -q $(printf %q "$BRANCH") && git -C ~/slamags-jax pull -q --ff-only || true; else git clone -q --branch $(printf %q "$BRANCH") $(printf %q "$REPO") ~/slamags-jax; fi"
  else
    get_code="rm -rf ~/slamags-jax && mkdir -p ~/slamags-jax && tar -xzf ~/slamags-src.tgz -C ~/slamags-jax"
  fi
  cat <<EOF
set -euo pipefail
$get_code
command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$PATH
[ -x ~/slamags-venv/bin/python ] || uv venv -q --python $(printf %q "$PYTHON_VERSION") ~/slamags-venv
uv pip install -q --python ~/slamags-venv/bin/python -e ~/slamags-jax "jax[tpu]"
EOF
}

copy_data_script() {  # the images from DATA_GCS to the worker's disk (when DATA_GCS is set)
  if [[ -n "$DATA_GCS" ]]; then
    echo "mkdir -p $DATA_ROOT && gcloud storage rsync --recursive --quiet $(printf %q "$DATA_GCS") $DATA_ROOT"
  fi
}
