#!/usr/bin/env bash
# One Cloud TPU VM (a single-host slice, e.g. v5litepod-8, v4-8, v6e-8): create it, install,
# run the pipeline on all its chips, copy the results to Cloud Storage, delete it.
#
# Runs:     python -m slamags_jax.main with CONFIG (default configs/paper.py: the Matek
#           bone-marrow cells, full-width ResNet18, 224 px, batch 256 split over the chips,
#           150 epochs of SLAM-AGS, then embedding, PAMIL and the report), on every worker
#           of the VM (`gcloud compute tpus tpu-vm ssh --worker=all`; one worker here).
# Launch:   PROJECT=my-project DATA_GCS=gs://my-bucket/Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer \
#             RESULTS_GCS=gs://my-bucket/slamags-runs bash launch/tpu_vm.sh all
#           then `bash launch/tpu_vm.sh logs` to follow it, `... delete` when done.
#           Steps one by one: create | setup | run | logs | status | delete
#           (`all` = create + setup + run). `run` may be repeated: a killed or preempted
#           run resumes from its newest checkpoint.
# Produces: on the VM, ~/workdirs/$RUN_NAME/report/summary.json and report.md (bag F1 / AUC,
#           top-400 retrieval) and every stage's outputs; copied to $RESULTS_GCS/$RUN_NAME
#           when the run ends (if RESULTS_GCS is set). Log: ~/slamags-$RUN_NAME.log on the VM.
#
# Why the workdir is on the VM's disk and copied afterwards: the pipeline writes its
# files atomically with POSIX calls (temporary file, fsync, os.replace) and orbax renames
# checkpoint folders; a gs:// path is not a POSIX folder, so the run writes locally.
#
# Environment (defaults):
#   PROJECT=<gcloud config project>  ZONE=europe-west4-b     TPU_NAME=slamags-tpu
#   ACCELERATOR_TYPE=v5litepod-8     RUNTIME_VERSION=v2-alpha-tpuv5-lite
#                                    (v4-8: tpu-ubuntu2204-base; v6e-8: v2-alpha-tpuv6e)
#   SPOT=0                           1: a Spot TPU (cheaper, may be preempted; `run` resumes)
#   REPO=                            git URL to clone on the VM; empty: ship this checkout
#   BRANCH=main                      branch or tag of REPO
#   CONFIG=configs/paper.py          config file inside the repo
#   RUN_NAME=paper                   workdir name (~/workdirs/$RUN_NAME on the VM)
#   DATA_GCS=                        gs:// folder of the cell images, copied to ~/data/cells
#   DATA_ROOT=~/data/cells           image folder on the VM (--config.data.root)
#   RESULTS_GCS=                     gs:// folder the workdir is copied to after the run
#   EXTRA_ARGS=                      more flags for slamags_jax.main (no single quotes), e.g.
#                                    "--config.bags.witness_rate=0.01 --config.pretrain.method=pcgrad"
#   PYTHON_VERSION=3.12              Python of the VM's virtualenv (made with uv)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-slamags-tpu}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"
source "$REPO_DIR/launch/tpu_common.sh"
RESULTS_GCS="${RESULTS_GCS:-}"

setup_script() {  # the install script run on every worker
  install_script
  copy_data_script
  echo "~/slamags-venv/bin/python -c 'import jax; print(jax.devices())'"
}

setup() {
  if [[ -z "$REPO" ]]; then
    ship_checkout
  fi
  on_workers all "$(setup_script)"
}

run_script() {  # the pipeline, detached (survives the ssh session), then the copy to GCS
  local workdir="\$HOME/workdirs/$RUN_NAME" log="\$HOME/slamags-$RUN_NAME.log" copy="true"
  if [[ -n "$RESULTS_GCS" ]]; then
    copy="gcloud storage rsync --recursive --quiet $workdir $(printf %q "${RESULTS_GCS%/}/$RUN_NAME")"
  fi
  cat <<EOF
cd ~/slamags-jax
setsid nohup bash -c '~/slamags-venv/bin/python -m slamags_jax.main --config=$(printf %q "$CONFIG") --workdir=$workdir --config.data.root=$DATA_ROOT $EXTRA_ARGS; rc=\$?; $copy; echo "slamags-jax: exit status \$rc"; exit \$rc' > $log 2>&1 < /dev/null &
echo "started on \$(hostname); log: $log"
EOF
}

case "${1:-}" in
  create) create ;;
  setup) setup ;;
  run) on_workers all "$(run_script)" ;;
  logs) on_workers 0 "tail -n 50 -f ~/slamags-$RUN_NAME.log" ;;
  status) on_workers all "tail -n 3 ~/slamags-$RUN_NAME.log; pgrep -f '[s]lamags_jax.main' >/dev/null && echo running || echo 'not running'" ;;
  delete) gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_TPU[@]}" --quiet ;;
  all) create && setup && on_workers all "$(run_script)" ;;
  *) echo "usage: $0 create|setup|run|logs|status|delete|all   (settings: see the comment at the top)" >&2; exit 2 ;;
esac
