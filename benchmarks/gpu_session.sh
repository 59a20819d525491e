#!/usr/bin/env bash
# The one prepared GPU session (about 8 minutes on one H100/H200): correctness first, then every timing.
#
# Here (once):  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux2014_x86_64 -d .whl g-mlp-pytorch==0.1.5
#               mkdir -p .fm && cp /usr/share/datasets/fashion-mnist/*.gz .fm/      (both git-ignored)
# There:        bash benchmarks/gpu_session.sh    (device tool: carry [".whl", ".fm"], timeout_s 560)
# Dry run here: DRY=1 bash benchmarks/gpu_session.sh      (CPU, tiny sizes, Triton interpreter; no compile)
#
# Writes to $OUT (the device tool's return folder) or runs/gpu, in order of importance, so that whatever a
# time limit cuts off is the least important: checks.txt (card, versions, correctness), suite.txt +
# gpu.json (benchmarks/run.py --suite gpu: every model, eager, with the plain-ops ablation),
# profile.txt (where a gMLP-B training step's time goes, ours and timm's; then FFT vs GEMM Toeplitz
# mixing), train.txt (`gmlp train`, one short epoch on the device, if Fashion-MNIST's files were carried in
# .fm/), compile.txt + gpu-compile.json (gMLP-B training, ours and timm's, torch.compile). 7 files: the
# device tool returns at most 8.
# Each step has its own time limit so that one stuck step cannot eat the session.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    dev=cpu; suite=smoke; subset=256; small=--small; prof="--size smoke --batch 2"; cross="16,32 --columns 8 --reps 1 --dtype bfloat16"
else
    dev=cuda; suite=gpu; subset=20000; small=; prof="--size b --batch 256"; cross="128,256,512,1024,2048,4096 --columns 65536 --dtype bfloat16"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    $PY -c "import sys, torch, triton, timm, transformers; print(sys.version.split()[0], torch.__version__, \
triton.__version__, timm.__version__, transformers.__version__)" 2>&1
    uptime
    timeout 120 $PY benchmarks/gpu_checks.py --device $dev $small 2>&1
} | tee "$OUT/checks.txt"
checks=$(grep -c '^FAIL' "$OUT/checks.txt")
timeout 240 $PY benchmarks/run.py --suite $suite --json "$OUT/gpu.json" 2>&1 | tee "$OUT/suite.txt"
timeout 60 $PY benchmarks/profile_step.py --device $dev $prof 2>&1 | grep -v '^USDT' | tee "$OUT/profile.txt"
# the main job's training loop on the device (bf16 autocast, fused AdamW, checkpoints, evaluation), short
if [ -d .fm ]; then
    timeout 90 $PY -m gmlp train --data-root .fm --device $dev --epochs 1 --train-subset $subset \
        --test-subset 2000 --output "${TMPDIR:-/tmp}/gmlp-gpu-train" --no-progress 2>&1 | tee "$OUT/train.txt"
fi
# shellcheck disable=SC2086
timeout 45 $PY benchmarks/toeplitz_crossover.py --device $dev --lengths $cross 2>&1 | tee -a "$OUT/profile.txt"
if [ "${DRY:-0}" != 1 ]; then
    timeout 200 $PY benchmarks/run.py --suite gpu --only vision --modes train --compile \
        --models "gmlp gmlp_b16_224,timm gmlp_b16_224" --json "$OUT/gpu-compile.json" 2>&1 | tee "$OUT/compile.txt"
fi
[ "$checks" = 0 ]
