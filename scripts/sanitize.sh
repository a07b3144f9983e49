#!/usr/bin/env bash
# Every CUDA kernel of gpurnn against NumPy (scripts/sanitize_kernels.py: eagerly, no CUDA graph, tiny
# shapes) under NVIDIA's compute-sanitizer: memcheck, racecheck, synccheck, then initcheck while time
# is left, each with a time limit, all within SANITIZE_SECONDS (default 150). Each tool's SUMMARY
# lines, the driver's verdict and the first error lines are appended to $SUMMARY (and printed); the
# whole logs go to $LOGS (default: a temporary folder). Without compute-sanitizer ($COMPUTE_SANITIZER
# where set, even empty; else on PATH, or in /usr/local/cuda*/bin or /usr/local/cuda*/compute-sanitizer)
# the driver runs alone and the summary says so. Exit status 0 when all was clean.
# A step of scripts/gpu_check.sh; alone: SUMMARY=summary.txt bash scripts/sanitize.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"  # the interpreter: $PYTHON, else python3 on PATH
summary="${SUMMARY:-/dev/null}"
logs="${LOGS:-$(mktemp -d)}"
mkdir -p "$logs"
note() { echo "$*" | tee -a "$summary"; }
sanitizer="${COMPUTE_SANITIZER-$(command -v compute-sanitizer || ls \
    /usr/local/cuda{,-*}/{bin,compute-sanitizer}/compute-sanitizer 2>/dev/null | head -n 1)}"
end=$(( $(date +%s) + ${SANITIZE_SECONDS:-150} ))
status=0

sanitized() {  # TOOL LIMIT DRIVER-ARGS...: the driver under one tool, for at most LIMIT seconds
    local tool=$1 limit=$2 log="$logs/sanitize_$1.log" left rc found
    shift 2
    left=$(( end - $(date +%s) ))
    if [ "$left" -lt 20 ]; then note "sanitizer $tool: not run (the sanitizer's time is spent)"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
    timeout "$limit" "$sanitizer" --tool "$tool" --error-exitcode 3 --print-limit 20 \
        "$python" scripts/sanitize_kernels.py "$@" >"$log" 2>&1
    rc=$?  # 3: the sanitizer found errors; 1: a result differs from NumPy's; 124: out of time
    status=$(( status || rc ))
    found="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tr '\n' ' ')"
    note "sanitizer $tool (rc $rc, at most $limit s): ${found:-no SUMMARY line (stopped early?) }$(grep \
        '^sanitize_kernels' "$log" | tail -n 1)"
    grep -E '^========= [A-Z]' "$log" | grep -v -e COMPUTE-SANITIZER -e SUMMARY | head -n 6 | tee -a "$summary"
}

if [ -z "$sanitizer" ]; then
    timeout 120 "$python" scripts/sanitize_kernels.py >"$logs/sanitize_driver.log" 2>&1
    status=$?
    note "sanitizer: none found; the driver alone (rc $status): $(grep '^sanitize_kernels' \
        "$logs/sanitize_driver.log" | tail -n 1)"
    exit "$status"
fi
sanitized memcheck 70 --exact-allocations  # each array its own allocation: a read past its end is seen
sanitized racecheck 40 --parts ops         # the kernels with shared memory all run in the ops part
sanitized synccheck 30 --parts ops
sanitized initcheck 40 --parts ops,train --exact-allocations
exit "$status"
