#!/usr/bin/env bash
# GPU check (issue 19): can this project keep one GPU busy? One short script, one JSON file.
#
# Runs, each as one JSON line from python -m slamags_jax.bench (or the PyTorch reference):
#   1. the pretraining step at the paper tier's size (ResNet18 full width, 224 px, batch
#      256 = 128 positive + 128 negative patches, SLAM-AGS), float32 and bfloat16;
#   2. the host input pipeline at paper sizes (250 px JPEG cells -> two 224 px views,
#      batch 256) with data.workers 0, 2, 4, 8, and the on-device augmentation path;
#   3. with more than one GPU: the same step on 1 GPU and on all of them (first loss and
#      parameter norm must agree to float32 rounding; see slamags_jax/bench.py);
#   4. the PyTorch reference step (tools/torch_parity/bench_reference.py) on the same GPU.
# Launch:   WHEELS=.whl bash launch/gpu_check.sh        (on the GPU machine, from a checkout
#                                                      with launch/gpu_wheels.sh's wheels;
#                                                      launch/README.md has the exact command)
#           OUT=/tmp/out STEPS=10 bash launch/gpu_check.sh
#           ALLOW_CPU=1 SIZE=32 BATCH=8 IMAGE=40 STEPS=2 WIDTH=8 bash launch/gpu_check.sh   # smoke test on a CPU
#           bash launch/gpu_dryrun.sh                   (that command in a CPU stand-in of the GPU machine)
# Produces: $OUT/gpu_check.json: {"commit", "host", "versions", "runs": [<one object per bench
#           line, with "check" and "wall_s">], "failed": [...]}, and $OUT/gpu_check.log with
#           everything printed. A bench that fails or outlasts BENCH_TIMEOUT is named under
#           "failed" and the script goes on (exit 1 at the end).
# Budget:   bounded by construction, not by a GPU speed: the wheel install, one JAX start, and
#           at most 5 benches of at most BENCH_TIMEOUT seconds each (4 x 85 s + the on-device
#           input 56 s = 6.6 min). Nothing here has been timed on a GPU yet. The input benches
#           take INPUT_STEPS batches: at paper sizes the host pipeline measured 240-650 views/s
#           on 2 cores (docs/performance.md), so 8 batches of 512 views per worker count fit.
#
# Environment (defaults):
#   PYTHON=python3      interpreter that has (or gets) jax with its CUDA plugin
#   WHEELS=             folder of wheels for what the interpreter lacks (grain, tfds, ...):
#                       installed with --no-index --no-deps into SITE (no network needed)
#   SITE=/tmp/slamags-site   where those wheels go (put first on PYTHONPATH)
#   SKIP_INSTALL=0      1: the interpreter has slamags_jax's dependencies already
#   OUT=<repo>/workdirs/gpu_check   where the JSON and the log go
#   STEPS=20  INPUT_STEPS=8  SIZE=224  IMAGE=250  BATCH=256  WIDTH=64  CELLS=1024  WORKERS=0,2,4,8
#   COMMIT=             the commit of the tree, for the JSON (default: git's, else "unknown")
#   ALLOW_CPU=0         1: run on whatever JAX sees (a smoke test of this script)
#   BENCH_TIMEOUT=85    seconds each bench may run (the on-device input bench: 2/3 of it)
#   INPUT_STEPS=8       timed batches of the input benches
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-}"
SITE="${SITE:-/tmp/slamags-site}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
OUT="${OUT:-$REPO/workdirs/gpu_check}"
STEPS="${STEPS:-20}"
SIZE="${SIZE:-224}"
IMAGE="${IMAGE:-250}"
BATCH="${BATCH:-256}"
WIDTH="${WIDTH:-64}"
CELLS="${CELLS:-1024}"
WORKERS="${WORKERS:-0,2,4,8}"
ALLOW_CPU="${ALLOW_CPU:-0}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-85}"
INPUT_STEPS="${INPUT_STEPS:-8}"
HALF=$((BATCH / 2))

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
LINES="$OUT/lines.jsonl"
: >"$LOG"
: >"$LINES"
FAILED=()
export PYTHONUNBUFFERED=1

if [[ "$SKIP_INSTALL" != 1 ]]; then
  if [[ -n "$WHEELS" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 || { echo "error: wheel install failed (see $LOG)" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    "$PYTHON" -m pip install -q -e "$REPO" >>"$LOG" 2>&1 || { echo "error: pip install failed (see $LOG)" >&2; exit 2; }
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

# One line on what JAX sees; stop unless it is a GPU (or ALLOW_CPU=1).
NDEV=$("$PYTHON" - "$ALLOW_CPU" <<'EOF' 2>>"$LOG"
import sys
import jax
d = jax.devices()
print(f"JAX {jax.__version__} on {jax.default_backend()}: {len(d)} x {d[0].device_kind}", file=sys.stderr)
if jax.default_backend() != "gpu" and sys.argv[1] != "1":
  sys.exit("error: JAX sees no GPU (set ALLOW_CPU=1 for a smoke test)")
print(len(d))
EOF
) || { tail -1 "$LOG" >&2; exit 2; }
DEVICE_LINE=$(tail -1 "$LOG")
echo "$DEVICE_LINE"

# run NAME LIMIT CMD...: runs a bench for at most LIMIT seconds, keeps its last line (a JSON
# object) with "check" = NAME and "wall_s" (its whole run: start, compiles and the timed steps).
run() {
  local name="$1" limit="$2"; shift 2
  echo "+ [$name] $*" | tee -a "$LOG"
  local last rc t0=$SECONDS
  last=$(timeout -k 10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | tail -1); rc=$?  # pipefail: the bench's status
  if [[ "$rc" != 0 || "$last" != "{"* ]]; then
    [[ "$rc" == 124 ]] && echo "  [$name] stopped after ${limit} s" | tee -a "$LOG"
    echo "  [$name] FAILED (see $LOG)"
    FAILED+=("$name")
    return
  fi
  "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[2]); d["check"]=sys.argv[1]; d["wall_s"]=int(sys.argv[3]); print(json.dumps(d))' \
    "$name" "$last" "$((SECONDS - t0))" >>"$LINES"
  echo "  [$name] ok ($((SECONDS - t0)) s)"
}

STEP=(-m slamags_jax.bench --mode step --pos "$HALF" --neg "$HALF" --size "$SIZE" --width "$WIDTH" --steps "$STEPS")
run step_float32 "$BENCH_TIMEOUT" "$PYTHON" "${STEP[@]}" --dtype float32
run step_bfloat16 "$BENCH_TIMEOUT" "$PYTHON" "${STEP[@]}" --dtype bfloat16
INPUT=(-m slamags_jax.bench --mode input --image-size "$IMAGE" --crop "$SIZE" --batch "$BATCH" --cells "$CELLS"
       --steps "$INPUT_STEPS")
run input_host "$BENCH_TIMEOUT" "$PYTHON" "${INPUT[@]}" --workers "$WORKERS"
run input_on_device "$((BENCH_TIMEOUT * 2 / 3))" "$PYTHON" "${INPUT[@]}" --workers 0 --on-device
if [[ "$NDEV" -gt 1 ]]; then
  run step_one_device "$BENCH_TIMEOUT" env CUDA_VISIBLE_DEVICES=0 "$PYTHON" "${STEP[@]}" --dtype float32
fi
if "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>>"$LOG"; then
  run torch_reference "$BENCH_TIMEOUT" "$PYTHON" -m tools.torch_parity.bench_reference --pos "$HALF" --neg "$HALF" --size "$SIZE" \
    --width "$WIDTH" --steps "$STEPS" --device cuda
else
  echo "  [torch_reference] skipped: no PyTorch with CUDA" | tee -a "$LOG"
fi

# The commit: COMMIT when set (a copied tree has no .git), else git's, else "unknown".
COMMIT="${COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
"$PYTHON" - "$LINES" "$OUT/gpu_check.json" "$COMMIT" "$DEVICE_LINE" "${FAILED[@]}" <<'EOF'
import json, platform, sys
from importlib import metadata
lines, out, commit, device, failed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
versions = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "numpy", "grain", "tensorflow-datasets", "array-record", "ml-collections", "torch"):
  try:
    versions[name] = metadata.version(name)
  except metadata.PackageNotFoundError:
    pass
runs = [json.loads(l) for l in open(lines) if l.strip()]
by = {r["check"]: r for r in runs}
if "step_one_device" in by and "step_float32" in by:
  a, b = by["step_float32"], by["step_one_device"]
  by["step_float32"]["vs_one_device"] = {
      k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in ("loss", "param_l2") if k in a and k in b}
json.dump({"commit": commit, "host": platform.node(), "device": device, "versions": versions, "runs": runs,
           "failed": failed}, open(out, "w"), indent=1)
print(f"wrote {out}: {len(runs)} runs, {len(failed)} failed")
EOF
rm -f "$LINES"
[[ ${#FAILED[@]} -eq 0 ]]
