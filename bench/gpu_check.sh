#!/usr/bin/env bash
# One command that returns every GPU figure (issue 24), under 7 minutes on one H100 or H200.
#
#   bash bench/gpu_check.sh [-o DIR] [--wheels DIR]... [--site DIR] [--budget S] [--stages LIST]
#                           [--dali] [--cpu]
#
# Made for a borrowed GPU node: its python3 is a venv that holds torch (never reinstalled); there is
# no package registry; what hpc needs beyond the image (hdf5plugin, numcodecs) comes as wheels in
# --wheels DIR (default .gpu-wheels; make it with `python bench/gpu_wheels.py`), installed with
# `pip install --no-index --no-deps --target SITE` and PYTHONPATH (a venv made from that venv would
# not see its torch). SITE (default .gpu-site) is kept, so a second call on the same node skips it.
#
# Stages (default tests,step,data,loader,train); each gets what is left of --budget (default 420 s)
# less a reserve for writing the results, and JSON is rewritten after every row and every stage:
#   tests   pytest -m gpu: the CUDA cases of tests/test_gpu.py, test_projector.py, test_projector3d.py,
#           test_device.py
#   step    bench/step.py badblock 168x400 batch 32: fp32 eager vs bf16 + channels_last + compile,
#           MFU against the datasheet and against a matrix product timed first on the same GPU
#   data    a synthetic dataset: 12 studies x 109 slices of 168x400 (Siemens mCT segment 0), blosc
#   loader  bench/loader.py torch (and DALI when it imports), workers 4 and 8, mCT dead blocks,
#           batch 32; ratio = loader slices/s / the bf16 step's samples/s from the step stage
#   train   hpc train configs/badblock.yaml on the GPU (DALI loader when it imports, else torch; with
#           the weights' moving average, train.ema),
#           stopped by SIGUSR2 sent to the trainer alone: it checkpoints and exits 75
#   listmode (only when named: a second call, --stages listmode) bench/listmode.py: a 1 GB mMR
#           list-mode file histogrammed with numpy, with torch on the GPU and (where numba imports)
#           the compiled kernel on every core, against `cat`, warm and cold (issue 25's target:
#           >= 0.5x cat); listmode.json
# --dali: the second, optional call after DALI's wheels were carried in parts (bench/dali_parts.py):
#   DALI must import; the tests are DALI's; stages default to tests,data,loader,train.
# --cpu: the same stages at small sizes on the CPU (bench/rehearse.py runs this under the node's
#   rules; tests/test_gpu_check.py runs that in CI).
#
# Back in DIR (default $OUT, where the node returns files from; else ./gpu-check-out), four files:
#   gpu_check.json (machine, every stage's rc, seconds and figures), step.json, loader.json, and
#   logs.tar.gz (each stage's log, the junit XML, the training run's metrics and config). Data and
#   checkpoints stay in ${TMPDIR:-/tmp}/hpc-gpu-check. The key figures are printed last.
# Exit status: 0 every stage ok, 1 a stage failed or ran out of time, 2 bad usage or hpc does not
# import (one line on stderr says which).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${OUT:-$ROOT/gpu-check-out}
WHEELS=()
SITE=$ROOT/.gpu-site
BUDGET=420
STAGES=""
CPU=0
DALI=0
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        -o) [ $# -ge 2 ] || die "-o needs a folder"; OUTDIR=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS+=("$2"); shift 2 ;;
        --site) [ $# -ge 2 ] || die "--site needs a folder"; SITE=$2; shift 2 ;;
        --budget) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--budget: expected whole seconds, got '${2:-}'"; BUDGET=$2; shift 2 ;;
        --stages) [ $# -ge 2 ] || die "--stages needs a list"; STAGES=$2; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --dali) DALI=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;  # the comment block above
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$STAGES" ] || { [ "$DALI" = 1 ] && STAGES=tests,data,loader,train || STAGES=tests,step,data,loader,train; }
for s in ${STAGES//,/ }; do
    case "$s" in tests|step|data|loader|train|listmode) ;;
        *) die "--stages: unknown stage '$s' (tests,step,data,loader,train,listmode)" ;; esac
done
[ ${#WHEELS[@]} -gt 0 ] || { [ -d "$ROOT/.gpu-wheels" ] && WHEELS=("$ROOT/.gpu-wheels"); }
for d in "${WHEELS[@]}"; do [ -d "$d" ] || die "--wheels $d: no such folder"; done

T0=$(date +%s)
RESERVE=30  # a stage's kill grace (20 s) + writing the results
WORK=${TMPDIR:-/tmp}/hpc-gpu-check
LOGS=$WORK/logs
RUN=$WORK/run
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR" "$WORK" || die "cannot create $OUTDIR or $WORK"
OUTDIR=$(cd "$OUTDIR" && pwd)
[[ ,$STAGES, == *,step,* ]] && rm -f "$WORK/step.json"  # the loader's divisor comes from this call's step
rm -rf "$LOGS" "$RUN" "$OUTDIR"/gpu_check.json "$OUTDIR"/step.json "$OUTDIR"/loader.json "$OUTDIR"/listmode.json \
    "$OUTDIR"/logs.tar.gz
mkdir -p "$LOGS"
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
MODE=$([ "$CPU" = 1 ] && echo cpu || echo gpu)$([ "$DALI" = 1 ] && echo +dali)

summary() {  # rewrite OUTDIR/gpu_check.json from what has finished (standard library only: fast)
    "$PY" bench/gpu_summary.py summary --out "$OUTDIR" --logs "$LOGS" --run "$RUN" --mode "$MODE" \
        --budget "$BUDGET" --started "$T0" "$@"
}

finish() {  # the returned files: JSON, logs capped at 4 MiB each and tarred; nothing else
    rm -f "$OUTDIR"/*.tmp
    [ -d "$RUN" ] && cp "$RUN"/metrics.jsonl "$RUN"/config.yaml "$LOGS"/ 2>/dev/null
    for f in "$LOGS"/*; do
        [ "$(stat -c %s "$f")" -le 4194304 ] || { tail -c 4194304 "$f" > "$f.cut" && mv "$f.cut" "$f"; }
    done
    tar -czf "$OUTDIR/logs.tar.gz" -C "$LOGS" .
    summary --final --print
}

fail() {  # one line on stderr, a record of why, the files that exist so far; exit 2
    local reason  # JSON-safe: no backslashes, control characters or double quotes
    reason=$(printf '%s' "$1" | tr -d '\\\000-\037' | tr '"' "'")
    printf '{"stage": "preflight", "rc": 2, "seconds": %d, "limit_s": 0, "reason": "%s"}\n' \
        "$(( $(date +%s) - T0 ))" "$reason" >> "$LOGS/stages.jsonl"
    finish > /dev/null 2>&1
    echo "gpu_check.sh: $1" >&2
    exit 2
}

STAGE_PID=""; STAGE_NAME=""; STAGE_T0=0; STAGE_LIMIT=0
on_signal() {  # the node's own limit came first: stop the stage, record it, keep what is written
    if [ -n "$STAGE_PID" ]; then
        kill -TERM "$STAGE_PID" 2>/dev/null
        printf '{"stage": "%s", "rc": 143, "status": "stopped", "seconds": %d, "limit_s": %d}\n' "$STAGE_NAME" \
            "$(( $(date +%s) - STAGE_T0 ))" "$STAGE_LIMIT" >> "$LOGS/stages.jsonl"
    fi
    echo "gpu_check.sh: stopped by a signal; writing what has finished" >&2
    finish
    exit 1
}
trap on_signal TERM INT

install_wheels() {  # pip --no-index --no-deps --target SITE, once per set of wheels
    local whl=() d
    for d in "${WHEELS[@]}"; do whl+=("$d"/*.whl); done
    [ ${#whl[@]} -gt 0 ] && [ -e "${whl[0]}" ] || return 0
    local want
    want=$(printf '%s\n' "${whl[@]##*/}" | sort)
    [ -f "$SITE/.installed" ] && [ -z "$(comm -23 <(echo "$want") <(sort "$SITE/.installed"))" ] && return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${whl[@]}" > "$LOGS/pip.log" 2>&1 || fail "pip install --no-index of ${WHEELS[*]} failed: $(tail -n 1 "$LOGS/pip.log")"
    echo "$want" >> "$SITE/.installed"
}

stage() {  # stage NAME LIMIT_S [timeout options] -- CMD...: run within what is left of the budget
    local name=$1 want=$2 opts=() t0 rc limit left
    shift 2
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    left=$(( BUDGET - ($(date +%s) - T0) - RESERVE ))
    limit=$(( want < left ? want : left ))
    if [ "$limit" -lt 10 ]; then
        printf '{"stage": "%s", "rc": null, "status": "skipped", "reason": "%d s of the budget left"}\n' \
            "$name" "$left" >> "$LOGS/stages.jsonl"
        echo "gpu_check: $name skipped ($left s of the budget left)"
        summary
        return
    fi
    t0=$(date +%s.%N)
    timeout "${opts[@]}" --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
    STAGE_PID=$!; STAGE_NAME=$name; STAGE_T0=${t0%.*}; STAGE_LIMIT=$limit
    wait "$STAGE_PID"
    rc=$?
    STAGE_PID=""
    printf '{"stage": "%s", "rc": %d, "seconds": %.1f, "limit_s": %d}\n' "$name" "$rc" \
        "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')" "$limit" >> "$LOGS/stages.jsonl"
    echo "gpu_check: $name rc=$rc ($(tail -n 1 "$LOGS/$name.log" | cut -c1-110))"
    summary
}

install_wheels
"$PY" -c "import torch, hdf5plugin, numcodecs, hpc.data, hpc.io.h5write, hpc.train" > "$LOGS/preflight.log" 2>&1 ||
    fail "hpc does not import with $PY: $(tail -n 1 "$LOGS/preflight.log"); carry the wheels (python bench/gpu_wheels.py; docs/BENCHMARKS.md)"
"$PY" bench/gpu_summary.py machine "$LOGS/machine.json" >> "$LOGS/preflight.log" 2>&1 || fail "torch does not start: $(tail -n 1 "$LOGS/preflight.log")"
HAVE_DALI=0
"$PY" -c "import nvidia.dali" >> "$LOGS/preflight.log" 2>&1 && HAVE_DALI=1
[ "$DALI" = 0 ] || [ "$HAVE_DALI" = 1 ] || fail "--dali: nvidia.dali does not import: $(tail -n 1 "$LOGS/preflight.log")"
[ "$CPU" = 1 ] || "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || fail "no CUDA device visible (--cpu runs the small CPU sizes)"
BACKENDS=torch; TRAIN_BACKEND=torch
[ "$HAVE_DALI" = 1 ] && { BACKENDS=torch,dali; TRAIN_BACKEND=dali; }

if [ "$CPU" = 1 ]; then  # the same stages and geometry, small counts and width: ~1-2 minutes on 2 cores
    DEV=cpu; BATCH=4; STUDIES=2; SLICES=109; BASE=4
    T_TESTS=120; T_STEP=90; T_DATA=60; T_LOADER=90; T_TRAIN=15; T_LM=90; LM_ARGS=(--gb 0.05 --runs numpy:1,cpu:1)
    STEP_ARGS=(--modes fp32 --batch 2 --warmup 1 --steps 2 --base "$BASE"); STEP_MODE=fp32  # no compile on CPU
    LOADER_ARGS=(--workers 2 --epochs 1 --base "$BASE"); TRAIN_ARGS=(data.workers=2 "model.base=$BASE" log.every=8 train.ema=0.999)
else
    DEV=cuda; BATCH=32; STUDIES=12; SLICES=109; BASE=64
    T_TESTS=110; T_STEP=150; T_DATA=40; T_LOADER=60; T_TRAIN=70; T_LM=150; LM_ARGS=(--gb 1.0 --runs numpy:1,cuda:1)
    STEP_ARGS=(--modes fp32,bf16 --batch 32 --warmup 3 --steps 10); STEP_MODE=bf16
    LOADER_ARGS=(--workers 4,8 --epochs 2); TRAIN_ARGS=(data.workers=8 log.every=320 train.ema=0.999)
fi
# the compiled list-mode kernel on every core, where numba imports (the node's bare venv lacks it)
"$PY" -c "import numba" 2>/dev/null && LM_ARGS[3]="${LM_ARGS[3]},numba:$(nproc)"
TEST_ARGS=(-m gpu tests/test_gpu.py tests/test_projector.py tests/test_projector3d.py tests/test_device.py)
if [ "$DALI" = 1 ]; then  # the call after the parts: little time is left, DALI's rows first
    TEST_ARGS=(-m gpu -k dali tests/test_gpu.py); BACKENDS=dali,torch
    [ "$CPU" = 1 ] || { T_TESTS=45; T_DATA=30; T_LOADER=60; T_TRAIN=50; LOADER_ARGS=(--workers 4 --epochs 2); }
fi
SCANNER="Siemens mCT"  # 168 views x 400 bins; dead blocks from its geometry, drawn on the device

for s in ${STAGES//,/ }; do
    case "$s" in
    tests) stage tests "$T_TESTS" -- env -u CI "$PY" -m pytest -q -p no:cacheprovider "${TEST_ARGS[@]}" \
        --junitxml "$LOGS/tests.xml" ;;
    step) stage step "$T_STEP" -- "$PY" bench/step.py --presets badblock --size 168x400 --device "$DEV" \
        --measure-peak "${STEP_ARGS[@]}" --json "$OUTDIR/step.json"
        [ -f "$OUTDIR/step.json" ] && cp "$OUTDIR/step.json" "$WORK/step.json" ;;  # for a later --dali call
    data) if [ "$(cat "$WORK/data.stamp" 2>/dev/null)" = "${STUDIES}x$SLICES" ]; then  # an earlier call's, same size
            stage data "$T_DATA" -- echo "dataset of an earlier call reused"
        else
            rm -rf "$WORK/data" "$WORK/data.stamp"
            stage data "$T_DATA" -- "$PY" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
import loader; loader.synthetic(Path('$WORK/data'), $STUDIES, $SLICES, 168, 400, 'blosc'); print('dataset ok')" &&
                [ -f "$WORK/data/manifest.json" ] && echo "${STUDIES}x$SLICES" > "$WORK/data.stamp"
        fi ;;
    loader) STEP_JSON=(); [ -f "$WORK/step.json" ] && STEP_JSON=(--step-json "$WORK/step.json" --step-mode "$STEP_MODE")
        stage loader "$T_LOADER" -- "$PY" bench/loader.py --data "$WORK/data" --size 168x400 --context 2 \
            --backends "$BACKENDS" --batch "$BATCH" --scanner "$SCANNER" --device "$DEV" --model badblock \
            "${LOADER_ARGS[@]}" "${STEP_JSON[@]}" --json "$OUTDIR/loader.json" ;;
    # --foreground: USR2 reaches the trainer alone (loader workers die of a signal meant for it);
    # --preserve-status: its exit 75 (checkpointed, requeue me) is the stage's rc, not timeout's 124
    train) stage train "$T_TRAIN" --foreground --preserve-status --signal=USR2 -- "$PY" -m hpc train \
        --config configs/badblock.yaml "data.path=$WORK/data" "train.run_dir=$RUN" "data.device=$DEV" \
        "data.backend=$TRAIN_BACKEND" "data.batch_size=$BATCH" "data.split=[0.75, 0.25, 0.0]" \
        "corrupt.scanner=$SCANNER" train.samples=100000000 train.val_every=0 checkpoint.every=0 \
        log.wandb=disabled log.progress=false log.images=false "${TRAIN_ARGS[@]}" ;;
    listmode) stage listmode "$T_LM" -- "$PY" bench/listmode.py "${LM_ARGS[@]}" --repeats 1 --dir "$WORK" \
        --out "$OUTDIR/listmode.json" ;;
    esac
done
trap - TERM INT
finish
grep -q '"status": "\(failed\|timeout\|skipped\|stopped\)"' "$OUTDIR/gpu_check.json" && exit 1
exit 0
