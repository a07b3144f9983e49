#!/usr/bin/env bash
# One epoch of full Penn Treebank each way on the CPU: the LSTM recipe of docs/results.md with the full softmax
# (scripts/ptb_lstm.toml, output tied to the embedding) and with the adaptive softmax
# (scripts/ptb_lstm_adaptive.toml: cutoffs 2000, 6000, div_value 4, untied). Adam lr 1e-3, gradient
# norm clipped to 0.5, B = 20, T = 35, as scripts/train_ptb.sh trains; validation at the end of the
# epoch. Prints, for each run, its validation perplexity and median training tokens/s, then the
# adaptive run's against the first.
# Usage: bash scripts/ptb_adaptive.sh [RUN_DIR] [more train options, such as --max-iters 20]
# PTB_VARIANTS names the model files to run (scripts/ptb_<name>.toml), default "lstm lstm_adaptive";
# "lstm lstm_untied lstm_adaptive" adds the untied full softmax, the adaptive run's like-for-like twin.
# Each run writes RUN_DIR/<name>.h5 and <name>.metrics.jsonl; a RUN_DIR that already has them is
# refused (a new run never appends to another's records): give a fresh one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
source "$repo/scripts/ptb_corpus.sh"
ptb_check
run="${1:-$repo/runs/ptb-adaptive}"
shift || true
mkdir -p "$run"
ptb_prepare "$run/ptb.h5"
variants=(${PTB_VARIANTS:-lstm lstm_adaptive})
for name in "${variants[@]}"; do
    echo "== $name (scripts/ptb_$name.toml)"
    "$python" -m gpurnn --backend numpy train "$run/ptb.h5" --model-config "$repo/scripts/ptb_$name.toml" --quiet \
        --optimizer adam --lr 1e-3 --clip 0.5 --batch-size 20 --time-size 35 --epochs 1 \
        --checkpoint "$run/$name.h5" --metrics "$run/$name.metrics.jsonl" "$@"
done
"$python" - "$run" "${variants[@]}" <<'PY'
import json, statistics, sys
run, names = sys.argv[1], sys.argv[2:]
found = {}
for name in names:
    steps = [r for r in map(json.loads, open(f"{run}/{name}.metrics.jsonl")) if r["kind"] == "step"]
    rate = statistics.median(r["tokens_per_second"] for r in steps)
    found[name] = (steps[-1]["valid_perplexity"], rate)
    print(f"{name:<16} valid perplexity {found[name][0]:8.2f}  training {rate:8,.0f} tokens/s "
          f"(median of {len(steps)} log windows, iteration {steps[-1]['iteration']})")
first = names[0]
for name in names[1:]:
    print(f"{name} against {first}: perplexity x{found[name][0] / found[first][0]:.3f}, "
          f"training speed x{found[name][1] / found[first][1]:.2f}")
PY
