#!/usr/bin/env bash
# The PTB results of docs/results.md: `rnn` (model scripts/ptb_rnn.toml) or `lstm` (model
# scripts/ptb_lstm.toml), trained on full Penn Treebank with Adam from lr 1e-3, divided by 4 whenever a
# validation perplexity does not improve on the best so far, then scored on valid and test with
# --batch-size 1 (one exact left-to-right pass). A checkpoint is written every 200 iterations: run the
# script again after a stop and it resumes where it stopped (bit-identically on NumPy, the learning
# rate as the checkpoint left it).
# Usage: bash scripts/train_ptb.sh rnn|lstm [RUN_DIR]
#
# Penn Treebank's text comes from $GPURNN_PTB_DIR (scripts/ptb_corpus.sh says how); the script stops
# with one line when it is not there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-}"
case "$model" in
    rnn) schedule="--epochs 16 --eval-every 1327" ;;  # validation once per epoch (1,327 iterations)
    lstm) schedule="--epochs 14 --eval-every 664" ;;  # validation twice per epoch
    *) echo "error: name the model: bash scripts/train_ptb.sh rnn|lstm [RUN_DIR] (got '$model')" >&2; exit 2 ;;
esac
source "$repo/scripts/ptb_corpus.sh"
ptb_check
run="${2:-$repo/runs/ptb-$model}"
mkdir -p "$run"
ptb_prepare "$run/ptb.h5"

start="--lr 1e-3"
[ -f "$run/checkpoint.h5" ] && start="--resume"
"$python" -m gpurnn --backend numpy train "$run/ptb.h5" --model-config "$repo/scripts/ptb_$model.toml" \
    --optimizer adam --clip 0.5 --lr-decay 0.25 --batch-size 20 --time-size 35 $schedule \
    --checkpoint "$run/checkpoint.h5" --save-every 200 --metrics "$run/metrics.jsonl" $start
for split in valid test; do
    "$python" -m gpurnn --backend numpy eval "$run/checkpoint.h5" "$run/ptb.h5" --split "$split" --batch-size 1 --json
done
