#!/usr/bin/env bash
# The one prepared GPU session (about 10 minutes on one H100/H200): correctness first, then every timing.
#
# Here (once):  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux2014_x86_64 -d .whl g-mlp-pytorch==0.1.5
# There:        bash benchmarks/gpu_session.sh            (device tool: carry [".whl"], timeout_s 600)
#
# Writes to $OUT (the device tool's return folder) or runs/gpu: gpu.txt (card, driver), checks.txt,
# suite.txt + gpu.json (benchmarks/run.py --suite gpu) and crossover.txt. Each step has its own time limit
# so that one stuck step cannot eat the session.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, timm, transformers; print(torch.__version__, triton.__version__, \
timm.__version__, transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

timeout 150 python3 benchmarks/gpu_checks.py --device cuda 2>&1 | tee "$OUT/checks.txt"
checks=$?
timeout 360 python3 benchmarks/run.py --suite gpu --json "$OUT/gpu.json" 2>&1 | tee "$OUT/suite.txt"
timeout 60 python3 benchmarks/toeplitz_crossover.py --device cuda --lengths 128,256,512,1024,2048,4096 \
    --columns 65536 2>&1 | tee "$OUT/crossover.txt"
exit $checks
