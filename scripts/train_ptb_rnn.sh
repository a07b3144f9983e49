#!/usr/bin/env bash
# Issue 4's result: an Elman RNN on full Penn Treebank (model: scripts/ptb_rnn.toml).
# Prepares the corpus once, trains with a checkpoint every 200 iterations (run it again to resume
# where it stopped, bit-identically on NumPy), then prints validation and test perplexity.
# Usage: bash scripts/train_ptb_rnn.sh [RUN_DIR]   (PTB from $GPURNN_PTB_DIR, default ../shared/data/ptb)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ptb="${GPURNN_PTB_DIR:-$repo/../shared/data/ptb}"
run="${1:-$repo/runs/ptb-rnn}"
mkdir -p "$run"
[ -f "$run/ptb.h5" ] || gpurnn prepare "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" \
    --test "$ptb/ptb.test.txt" --output "$run/ptb.h5"
resume=""
[ -f "$run/checkpoint.h5" ] && resume="--resume"
gpurnn --backend numpy train "$run/ptb.h5" --model-config "$repo/scripts/ptb_rnn.toml" \
    --optimizer adam --lr 2e-3 --clip 0.5 --lr-decay 0.25 --epochs 12 --batch-size 20 --time-size 35 \
    --eval-every 1327 --checkpoint "$run/checkpoint.h5" --save-every 200 --metrics "$run/metrics.jsonl" $resume
for split in valid test; do
    gpurnn --backend numpy eval "$run/checkpoint.h5" "$run/ptb.h5" --split "$split" --batch-size 1 --json
done
