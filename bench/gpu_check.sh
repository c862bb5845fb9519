#!/usr/bin/env bash
# One-shot GPU check (issue 15): everything a single H200 can tell, in under 9 minutes, as JSON.
#
#   bench/gpu_check.sh [-o OUT_DIR] [--wheels DIR] [--cpu-smoke]
#
# Stages (each with its own time limit; a failed stage is recorded and the next one runs):
#   tests   the gpu-marked tests: DALI GPU pipeline == torch backend (augmentation off), bf16 +
#           channels_last + compile steps, predict on GPU == CPU, no host sync in a steady step
#   step    bench/step.py: badblock at 168x400, fp32 eager vs bf16 + channels_last + compile, MFU
#   loader  bench/loader.py: torch and DALI backends at 168x400 with the training step's rate
#   train   a 2-minute `hpc train` on the GPU with the DALI loader (SIGTERM at the limit: the
#           trainer checkpoints and exits 75), its samples/s from metrics.jsonl
# Results: OUT_DIR/gpu_check.json (one entry per stage: rc, seconds, figures) plus each tool's own
# JSON/log beside it. Copy OUT_DIR back and put the figures in docs/BENCHMARKS.md.
#
# A GPU node without a package registry: the node's torch is used (never reinstalled); what else
# is needed comes as wheels. On a machine with a registry and the same Python version:
#   pip download -d wheels h5py hdf5plugin numcodecs xxhash pyyaml scikit-image pytorch-msssim \
#       submitit nvidia-dali-cuda130 && pip wheel --no-deps -w wheels .
# then on the node: bench/gpu_check.sh --wheels wheels   (a venv with --system-site-packages).
#
# --cpu-smoke runs every stage at toy sizes on the CPU (the DALI stages use the torch backend when
# DALI is missing): what tests/test_gpu_check.py runs to keep this script working without a GPU.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=gpu-check-$(date +%Y%m%d-%H%M%S)
WHEELS=""
SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        -o) OUT=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
if [ -n "$WHEELS" ]; then
    "$PY" -m venv --system-site-packages "$OUT/venv" || exit 2
    "$OUT/venv/bin/pip" install --no-index --find-links "$WHEELS" hpc || exit 2
    PY="$OUT/venv/bin/python"
fi
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
STAGES="$OUT/stages.jsonl"
: > "$STAGES"

if [ "$SMOKE" = 1 ]; then
    DEV=cpu; SIZE=24x32; T_TESTS=300; T_STEP=300; T_LOADER=300; T_TRAIN=300  # toy work ends by itself
    STEP_ARGS=(--device cpu --batch 2 --base 4 --warmup 1 --steps 2); MODES=fp32  # no compile on CPU
    LOADER_ARGS=(--device cpu --workers 0 --studies 2 --slices 32 --epochs 2 --base 4 --steps 2 --batch 4)
    TRAIN_SLICES=64; TRAIN_SAMPLES=16  # a fixed amount of training, not a time slice
    "$PY" -c "import nvidia.dali" 2>/dev/null && BACKENDS=torch,dali || BACKENDS=torch
else
    DEV=cuda; SIZE=168x400; T_TESTS=180; T_STEP=120; T_LOADER=90; T_TRAIN=120
    STEP_ARGS=(--device cuda); MODES=fp32,bf16
    LOADER_ARGS=(--device cuda --workers 4,8 --studies 4 --slices 256 --epochs 3 --batch 32)
    TRAIN_SLICES=1024; TRAIN_SAMPLES=100000000  # stopped by the 2-minute limit (SIGTERM: checkpoint, exit 75)
    BACKENDS=torch,dali
fi
TRAIN_BACKEND=${BACKENDS##*,}  # dali when available

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0 rc
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '{"stage": "%s", "rc": %d, "seconds": %.1f, "limit_s": %d}\n' \
        "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" "$limit" >> "$STAGES"
    echo "gpu_check: $name rc=$rc ($(tail -n 1 "$OUT/$name.log" | cut -c1-100))"
}

stage tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_projector.py \
    --junitxml "$OUT/tests.xml"
stage step "$T_STEP" "$PY" bench/step.py --presets badblock --modes "$MODES" --size "$SIZE" "${STEP_ARGS[@]}" \
    --json "$OUT/step.json"
stage loader "$T_LOADER" "$PY" bench/loader.py --size "$SIZE" --context 2 --backends "$BACKENDS" \
    --model badblock "${LOADER_ARGS[@]}" --json "$OUT/loader.json"
V=${SIZE%x*}; X=${SIZE#*x}
"$PY" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import loader; \
loader.synthetic(Path('$OUT/data'), 4, $TRAIN_SLICES, $V, $X, 'blosc')" > "$OUT/data.log" 2>&1
stage train "$T_TRAIN" "$PY" -m hpc train --config configs/badblock.yaml "data.path=$OUT/data" \
    "train.run_dir=$OUT/run" "data.device=$DEV" "data.backend=$TRAIN_BACKEND" data.workers=4 \
    "data.split=[0.75, 0.25, 0.0]" corrupt.dead_blocks=0 "train.samples=$TRAIN_SAMPLES" train.val_every=0 \
    checkpoint.every=0 log.wandb=disabled log.progress=false log.every=64 \
    $([ "$SMOKE" = 1 ] && echo model.base=4 data.batch_size=4 data.workers=0 log.every=4)

"$PY" - "$OUT" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
result = {"machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                      "torch": torch.__version__, "python": platform.python_version(),
                      "host": platform.node()},
          "stages": {}}
for line in (out / "stages.jsonl").read_text().splitlines():
    row = json.loads(line)
    result["stages"][row.pop("stage")] = row
if (out / "tests.xml").is_file():
    root = ET.parse(out / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    result["stages"]["tests"]["junit"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for name in ("step", "loader"):
    if (out / f"{name}.json").is_file():
        result["stages"][name]["rows"] = json.loads((out / f"{name}.json").read_text())
metrics = out / "run" / "metrics.jsonl"
if metrics.is_file():
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]
    result["stages"]["train"]["samples"] = max((r["step"] for r in train), default=0)
    result["stages"]["train"]["samples_per_s"] = train[-1]["samples_per_s"] if train else None
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(f"gpu_check: {out / 'gpu_check.json'}")
EOF
