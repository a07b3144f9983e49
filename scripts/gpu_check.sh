#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (CuPy installed there, possibly no package registry):
# install gpurnn without dependencies, run the test suite (the CuPy parity checks run where a device
# is usable), then time the simple-rnnlm training step on NumPy and CuPy. Prints a compact summary.
# Usage: bash scripts/gpu_check.sh   (writes JSON to $OUT when that is set)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpurnn_gpu_check}"
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m gpurnn --backend cupy info
echo "== tests (CuPy parity included)"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
echo "== train-step timing"
timeout 200 python3 scripts/bench.py --quick --json "$out/bench.json"
bench_rc=$?
echo "== summary: tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
