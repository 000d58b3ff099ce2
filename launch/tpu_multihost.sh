#!/usr/bin/env bash
# A multi-host Cloud TPU slice (e.g. v5litepod-16: 2 hosts x 8 chips; v4-32: 4 hosts x 4
# chips): one JAX process per host, one program over all chips of all hosts.
#
# Runs:     python -m slamags_jax.main with CONFIG (default configs/paper.py: the Matek
#           bone-marrow cells, full-width ResNet18, 224 px, batch 256 split over every chip
#           of the slice, 150 epochs of SLAM-AGS, then embedding, PAMIL and the report) on all
#           workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`). Each process calls
#           jax.distributed.initialize() (SLAMAGS_DISTRIBUTED=1; JAX finds the coordinator,
#           process count and id from the TPU metadata), loads its own rows of every batch,
#           and process 0 alone writes the outputs.
# Launch:   PROJECT=my-project SHARED_BUCKET=my-bucket \
#             DATA_GCS=gs://my-bucket/Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer \
#             bash launch/tpu_multihost.sh all
#           then `bash launch/tpu_multihost.sh logs`, and `... delete` when done.
#           Steps one by one: create | setup | bags | run | logs | status | delete
#           (`all` = create + setup + bags + run). `run` may be repeated: a killed or
#           preempted run resumes from its newest checkpoint.
# Produces: gs://$SHARED_BUCKET/workdirs/$RUN_NAME/report/summary.json and report.md (bag
#           F1 / AUC, top-400 retrieval) and every stage's outputs (the shared workdir).
#           Logs: ~/slamags-$RUN_NAME.log on each worker.
#
# The workdir must be ONE folder that every host sees at the same path: orbax writes a
# checkpoint from all processes, and the hosts read what process 0 wrote (manifest,
# embeddings). This script mounts gs://$SHARED_BUCKET at ~/shared on every worker with
# Cloud Storage FUSE (renames of checkpoint folders allowed, metadata caching off so a
# host sees another's new files at once). A gs:// path itself does not work as the
# workdir (the pipeline writes with POSIX calls: temporary file, fsync, os.replace). An
# NFS share (Filestore) is the more POSIX-faithful choice: set SHARED_MOUNT_CMD to the
# command that mounts it at ~/shared. The images are copied to each host's disk (every
# host reads any cell).
#
# The bags stage runs first, alone on worker 0 with JAX on the CPU (it checks every image
# and draws the bags: minutes on 171 k files, no accelerator work), so the slice-wide run
# does not wait at a barrier meanwhile.
#
# Environment (defaults):
#   PROJECT=<gcloud config project>  ZONE=europe-west4-b     TPU_NAME=slamags-slice
#   ACCELERATOR_TYPE=v5litepod-16    RUNTIME_VERSION=v2-alpha-tpuv5-lite
#                                    (v4-32: tpu-ubuntu2204-base; v6e-16: v2-alpha-tpuv6e)
#   SPOT=0                           1: Spot TPUs (cheaper, may be preempted; `run` resumes)
#   SHARED_BUCKET=                   bucket name (no gs://) for the shared workdir (required
#                                    unless SHARED_MOUNT_CMD is set)
#   SHARED_MOUNT_CMD=                command that mounts a shared folder at ~/shared instead
#   REPO=                            git URL to clone on the workers; empty: ship this checkout
#   BRANCH=main                      branch or tag of REPO
#   CONFIG=configs/paper.py          config file inside the repo
#   RUN_NAME=paper                   workdir: ~/shared/workdirs/$RUN_NAME
#   DATA_GCS=                        gs:// folder of the cell images, copied to each worker
#   DATA_ROOT=~/data/cells           image folder on every worker (--config.data.root)
#   EXTRA_ARGS=                      more flags for slamags_jax.main (no single quotes)
#   PYTHON_VERSION=3.12              Python of the workers' virtualenv (made with uv)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-slamags-slice}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
source "$REPO_DIR/launch/tpu_common.sh"
SHARED_BUCKET="${SHARED_BUCKET:-}"
SHARED_MOUNT_CMD="${SHARED_MOUNT_CMD:-}"

if [[ -z "$SHARED_BUCKET" && -z "$SHARED_MOUNT_CMD" ]]; then
  echo "error: set SHARED_BUCKET (a bucket for the shared workdir) or SHARED_MOUNT_CMD" >&2
  exit 2
fi
WORKDIR="\$HOME/shared/workdirs/$RUN_NAME"
MAIN="~/slamags-venv/bin/python -m slamags_jax.main --config=$(printf %q "$CONFIG") --workdir=$WORKDIR --config.data.root=$DATA_ROOT $EXTRA_ARGS"

mount_script() {  # mounts the shared workdir folder at ~/shared (idempotent)
  if [[ -n "$SHARED_MOUNT_CMD" ]]; then
    echo "mkdir -p ~/shared && (mountpoint -q ~/shared || $SHARED_MOUNT_CMD)"
    return
  fi
  cat <<EOF
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
mkdir -p ~/shared
mountpoint -q ~/shared || gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 $(printf %q "$SHARED_BUCKET") ~/shared
EOF
}

setup_script() {  # the install script run on every worker
  install_script
  mount_script
  copy_data_script
  # Every worker at once: the distributed runtime comes up and sees the whole slice.
  echo "cd ~/slamags-jax && SLAMAGS_DISTRIBUTED=1 ~/slamags-venv/bin/python -c 'from slamags_jax.runtime import parallel; parallel.initialize(); import jax; print(f\"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of {jax.device_count()} devices\")'"
}

bags_script() {  # the bags stage alone on one worker, JAX on the CPU, no distributed runtime
  cat <<EOF
set -euo pipefail
$(mount_script)
cd ~/slamags-jax
JAX_PLATFORMS=cpu SLAMAGS_DISTRIBUTED=0 $MAIN --config.stages=bags
EOF
}

run_script() {  # the pipeline on every worker, detached (survives the ssh session)
  local log="\$HOME/slamags-$RUN_NAME.log"
  cat <<EOF
$(mount_script)
cd ~/slamags-jax
SLAMAGS_DISTRIBUTED=1 setsid nohup bash -c '$MAIN; echo "slamags-jax: exit status \$?"' > $log 2>&1 < /dev/null &
echo "started on \$(hostname); log: $log"
EOF
}

case "${1:-}" in
  create) create ;;
  setup)
    if [[ -z "$REPO" ]]; then ship_checkout; fi
    on_workers all "$(setup_script)" ;;
  bags) on_workers 0 "$(bags_script)" ;;
  run) on_workers all "$(run_script)" ;;
  logs) on_workers 0 "tail -n 50 -f ~/slamags-$RUN_NAME.log" ;;
  status) on_workers all "tail -n 3 ~/slamags-$RUN_NAME.log; pgrep -f '[s]lamags_jax.main' >/dev/null && echo running || echo 'not running'" ;;
  delete) gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_TPU[@]}" --quiet ;;
  all)
    create
    if [[ -z "$REPO" ]]; then ship_checkout; fi
    on_workers all "$(setup_script)"
    on_workers 0 "$(bags_script)"
    on_workers all "$(run_script)" ;;
  *) echo "usage: $0 create|setup|bags|run|logs|status|delete|all   (settings: see the comment at the top)" >&2; exit 2 ;;
esac
