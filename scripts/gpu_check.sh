#!/usr/bin/env bash
# The prepared command for a machine with a CUDA GPU (CuPy installed there, no package registry).
# Installs gpurnn without dependencies, probes CUDA-graph capture of a cuBLAS GEMM and a kernel, runs
# the whole test suite with CuPy as the default backend (the CuPy parity and CUDA-graph tests run
# where a device is usable), then the benchmark beside PyTorch on the same GPU. With --ptb it also
# trains the 2 x 650 tied LSTM (scripts/ptb_medium.toml) on Penn Treebank for at most 8 minutes and
# scores its checkpoint; the corpus must be prepared beforehand as runs/ptb.h5 (`gpurnn prepare`).
# Logs, JSON and the checkpoint go to $OUT (default runs/gpu_check). Each part has its own timeout.
# Usage: bash scripts/gpu_check.sh [--ptb]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { tail -n 5 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m gpurnn --backend cupy info --json | tee "$out/info.json"

echo "== CUDA graph capture probe: one cuBLAS GEMM and one elementwise kernel"
timeout 60 python3 - <<'PY' 2>&1 | tee "$out/capture_probe.log"
import cupy
a = cupy.random.rand(64, 64, dtype=cupy.float32)
out = cupy.empty_like(a)
stream = cupy.cuda.Stream(non_blocking=True)
with stream:
    stream.begin_capture()
    cupy.matmul(a, a, out=out)
    out += 1
    graph = stream.end_capture()
graph.launch(stream)
stream.synchronize()
print("captured and replayed; max error", float(abs(out - (a @ a + 1)).max()))
PY

echo "== tests, CuPy as the default backend"
GPURNN_BACKEND=cupy timeout 300 python3 -m pytest -q -p no:cacheprovider tests >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/tests.log"

echo "== benchmark beside PyTorch"
timeout 240 python3 scripts/bench.py --repeat 1 --iters 50 --warmup 10 --json "$out/bench.json" 2>&1 \
    | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

ptb_rc=0
if [ "${1:-}" = "--ptb" ]; then
    echo "== PTB: 2 x 650 tied LSTM, at most 8 minutes of training"
    start=$(date +%s)
    timeout 480 python3 -m gpurnn --backend cupy train runs/ptb.h5 --model-config scripts/ptb_medium.toml \
        --optimizer adam --lr 2e-3 --clip 0.5 --lr-decay 0.25 --batch-size 20 --time-size 35 --epochs 40 \
        --eval-every 1327 --checkpoint "$out/ptb_medium.h5" --save-every 500 \
        --metrics "$out/ptb_medium.jsonl" --quiet >"$out/ptb_train.log" 2>&1
    echo "training ended (rc $?) after $(( $(date +%s) - start )) s" | tee -a "$out/ptb_train.log"
    for split in valid test; do
        timeout 60 python3 -m gpurnn --backend cupy eval "$out/ptb_medium.h5" runs/ptb.h5 --split "$split" \
            --batch-size 1 --json | tee "$out/ptb_$split.json"
        rc=${PIPESTATUS[0]}
        ptb_rc=$(( ptb_rc || rc ))
    done
fi
echo "== summary: tests rc=$tests_rc bench rc=$bench_rc ptb rc=$ptb_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$ptb_rc" = 0 ]
