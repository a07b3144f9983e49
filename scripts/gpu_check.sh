#!/usr/bin/env bash
# The prepared command for a machine with a CUDA GPU (CuPy installed there, no package registry),
# sized to fit one device call of under 10 minutes:
#   1. install gpurnn without dependencies (with the setuptools wheel carried in .whl/ where the
#      machine's setuptools is older than 77); record the GPU and versions; probe CUDA-graph capture
#      of a cuBLAS GEMM and a kernel;
#   2. every kernel against NumPy under compute-sanitizer (scripts/sanitize.sh: memcheck, racecheck,
#      synccheck, initcheck over scripts/sanitize_kernels.py, within SANITIZE_SECONDS, default 150);
#      each tool's ERROR SUMMARY goes to summary.txt. Without compute-sanitizer the driver runs alone
#      and the summary says so;
#   3. the benchmark beside PyTorch on the same GPU while nothing else runs (small-rnn, medium-lstm), then
#      sentence scoring (scripts/bench_score.py on the corpus's test split: batched, one at a time, PyTorch);
#   4. the whole test suite with CuPy as the default backend; with --ptb, at the same time, the 2 x 650
#      tied LSTM (scripts/ptb_medium.toml, the textbook's recipe: SGD lr 20, clip 0.25, lr / 4 when
#      validation stops improving) trains on Penn Treebank for at most PTB_SECONDS (default 400, less
#      where the parts before ran long: the whole script keeps within GPU_CHECK_BUDGET, 570 s); its
#      checkpoint of best validation perplexity is scored on valid and test, stripped of its optimizer
#      state and split into parts under 16 MiB. The corpus is prepared beforehand as runs/ptb.h5 (or
#      $PTB_CORPUS) and carried with .whl/ (setuptools, and mpich and mpi4py wheels for the MPI tests
#      where the machine has no mpiexec): run(carry=["runs/ptb.h5", ".whl"]).
# $OUT (default runs/gpu_check) receives at most 8 files: summary.txt, logs.tar.gz (every log and
# JSON) and ptb_medium.h5.part*; `cat ptb_medium.h5.part* > ptb_medium.h5` joins the checkpoint (its
# sha256 is in summary.txt). Usage: bash scripts/gpu_check.sh [--ptb]
# GPU_CHECK_QUICK=1 makes it a dry run of a minute or two with the gpurnn already installed: the
# benchmark's quick mode on small-rnn, the GPU tests only (tests/test_host_cupy.py runs it so on the
# CPU through the stand-in for CuPy, with a small corpus as PTB_CORPUS, where no compute-sanitizer
# exists: the kernels' driver then runs alone).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
work="$(mktemp -d)"
logs="$work/logs"
mkdir -p "$out" "$logs"
ptb_pid=""
finish() {
    [ -n "$ptb_pid" ] && kill "$ptb_pid" 2>/dev/null && wait "$ptb_pid"  # training still running: stop it
    tar -czf "$out/logs.tar.gz" -C "$logs" --exclude '*.h5' . 2>/dev/null
    rm -rf "$work"
}
trap finish EXIT  # the logs come back even from a run stopped at its time limit
trap 'exit 143' TERM INT
summary="$out/summary.txt"
: >"$summary"
ptb_seconds="${PTB_SECONDS:-400}"
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-570} ))  # the whole script's, inside a 600 s call
corpus="${PTB_CORPUS:-runs/ptb.h5}"
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"  # the interpreter: $PYTHON, else python3 on PATH
note() { echo "$*" | tee -a "$summary"; }
bench_args=(--configs small-rnn,medium-lstm --repeat 1 --iters 200 --warmup 20)
score_args=(--device cuda)
tests=(tests)
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    bench_args=(--configs small-rnn --quick --no-torch)
    score_args=(--configs small-rnn --quick --device cpu)
    tests=(tests/test_gpu.py)
fi

install() { "$python" -m pip install -q --no-deps --no-build-isolation -e . >>"$logs/install.log" 2>&1; }
# The machine's setuptools may predate `license = "MIT"` (77): then a newer one from .whl/.
if [ "${GPU_CHECK_QUICK:-0}" != 1 ] && ! install; then
    note "install failed ($(tail -n 1 "$logs/install.log")); retrying with $(ls .whl/setuptools-*.whl 2>/dev/null)"
    "$python" -m pip install -q --no-index --no-deps --target /tmp/setuptools .whl/setuptools-*.whl \
        >>"$logs/install.log" 2>&1 && PYTHONPATH=/tmp/setuptools install \
        || { tail -n 5 "$logs/install.log" | tee -a "$summary"; exit 1; }
fi
# No mpiexec there: MPICH and mpi4py from .whl/, so that the MPI tests (NCCL's among them) run.
if ! command -v mpiexec >/dev/null && ls .whl/mpich-*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/mpi .whl/mpich-*.whl .whl/mpi4py-*.whl \
        >>"$logs/install.log" 2>&1 && export PATH="/tmp/mpi/bin:$PATH" PYTHONPATH="/tmp/mpi${PYTHONPATH:+:$PYTHONPATH}"
fi
note "mpi: $(command -v mpiexec || echo 'none: the MPI tests skip')"
note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
"$python" -m gpurnn --backend cupy info --json >"$logs/info.json" 2>&1
note "$("$python" -m gpurnn --version 2>&1); $("$python" -c 'import cupy, numpy; print("cupy", cupy.__version__, "numpy", numpy.__version__)')"

timeout 60 "$python" scripts/capture_probe.py >"$logs/capture_probe.log" 2>&1
note "capture probe: $(tail -n 1 "$logs/capture_probe.log")"

echo "== every kernel against NumPy under compute-sanitizer, eagerly, before the benchmark"
SUMMARY="$summary" LOGS="$logs" bash scripts/sanitize.sh
sanitize_rc=$?

echo "== benchmark beside PyTorch, nothing else on the GPU"
timeout 120 "$python" scripts/bench.py --backends cupy "${bench_args[@]}" --json "$logs/bench.json" 2>&1 \
    | tee "$logs/bench.log"
bench_rc=${PIPESTATUS[0]}
grep -E "^(small|medium)" "$logs/bench.log" >>"$summary"
timeout 150 "$python" scripts/bench_score.py --backend cupy --corpus "$corpus" "${score_args[@]}" \
    --json "$logs/bench_score.json" 2>&1 | tee "$logs/bench_score.log"
score_rc=${PIPESTATUS[0]}
grep -E "^(small|medium)" "$logs/bench_score.log" | sed 's/^/score: /' >>"$summary"

if [ "${1:-}" = "--ptb" ]; then
    left=$(( deadline - $(date +%s) - 80 ))  # 80 s kept for scoring, stripping and splitting
    [ "$left" -lt "$ptb_seconds" ] && ptb_seconds=$(( left > 30 ? left : 30 ))
    note "ptb: at most $ptb_seconds s of training"
    ptb_start=$(date +%s)
    timeout "$ptb_seconds" "$python" -m gpurnn --backend cupy train "$corpus" \
        --model-config scripts/ptb_medium.toml --optimizer sgd --lr 20 --clip 0.25 --lr-decay 0.25 \
        --batch-size 20 --time-size 35 --epochs 40 --eval-every 1327 --log-every 200 --seed 1 \
        --checkpoint "$logs/ptb_medium.h5" --keep-best --save-every 1327 --metrics "$logs/ptb_medium.jsonl" \
        >"$logs/ptb_train.log" 2>&1 &
    ptb_pid=$!
fi

echo "== tests, CuPy as the default backend"
GPURNN_BACKEND=cupy OPENBLAS_NUM_THREADS=4 timeout 300 "$python" -m pytest -q -p no:cacheprovider \
    -m "not packaging" "${tests[@]}" >"$logs/tests.log" 2>&1
tests_rc=$?
note "tests (rc $tests_rc): $(tail -n 1 "$logs/tests.log")"
grep -E "^(FAILED|ERROR)" "$logs/tests.log" | head -n 20 >>"$summary"

ptb_rc=0
if [ -n "$ptb_pid" ]; then
    wait "$ptb_pid"
    train_rc=$?  # 124: stopped at the time limit (the checkpoint is saved on SIGTERM)
    ptb_pid=""
    note "ptb training: rc $train_rc after $(( $(date +%s) - ptb_start )) s; $(tail -n 2 "$logs/ptb_train.log" | tr '\n' ' ')"
    scored="$logs/ptb_medium.h5"
    [ -f "$logs/ptb_medium.best.h5" ] && scored="$logs/ptb_medium.best.h5"  # best validation perplexity
    note "ptb scored: $(basename "$scored")"
    for split in valid test; do
        timeout 60 "$python" -m gpurnn --backend cupy eval "$scored" "$corpus" --split "$split" \
            --batch-size 1 --json >"$logs/ptb_$split.json" 2>&1
        rc=$?
        ptb_rc=$(( ptb_rc || rc ))
        note "ptb $split (rc $rc): $(tr -d '\n ' <"$logs/ptb_$split.json")"
    done
    "$python" -m gpurnn strip "$scored" "$logs/ptb_medium.weights.h5" | tee -a "$summary"
    note "ptb checkpoint sha256: $(sha256sum "$logs/ptb_medium.weights.h5" | cut -d' ' -f1)"
    split -b 15M -d "$logs/ptb_medium.weights.h5" "$out/ptb_medium.h5.part"
fi
note "summary: sanitize rc=$sanitize_rc tests rc=$tests_rc bench rc=$bench_rc score rc=$score_rc ptb rc=$ptb_rc"
[ "$sanitize_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$score_rc" = 0 ] && [ "$ptb_rc" = 0 ]
