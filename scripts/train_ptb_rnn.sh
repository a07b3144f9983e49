#!/usr/bin/env bash
# Issue 4's result: an Elman RNN on full Penn Treebank (model: scripts/ptb_rnn.toml), trained with
# Adam from lr 1e-3, divided by 4 whenever an epoch's validation perplexity does not improve, then
# scored on valid and test with --batch-size 1 (one exact left-to-right pass). A checkpoint is written
# every 200 iterations: run the script again after a stop and it resumes where it stopped
# (bit-identically on NumPy, the learning rate as the checkpoint left it).
# Usage: bash scripts/train_ptb_rnn.sh [RUN_DIR]   (PTB from $GPURNN_PTB_DIR, default ../shared/data/ptb)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ptb="${GPURNN_PTB_DIR:-$repo/../shared/data/ptb}"
run="${1:-$repo/runs/ptb-rnn}"
mkdir -p "$run"
[ -f "$run/ptb.h5" ] || gpurnn prepare "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" \
    --test "$ptb/ptb.test.txt" --output "$run/ptb.h5"

start="--lr 1e-3"
[ -f "$run/checkpoint.h5" ] && start="--resume"
gpurnn --backend numpy train "$run/ptb.h5" --model-config "$repo/scripts/ptb_rnn.toml" \
    --optimizer adam --clip 0.5 --lr-decay 0.25 --batch-size 20 --time-size 35 --eval-every 1327 \
    --epochs 16 --checkpoint "$run/checkpoint.h5" --save-every 200 --metrics "$run/metrics.jsonl" $start
for split in valid test; do
    gpurnn --backend numpy eval "$run/checkpoint.h5" "$run/ptb.h5" --split "$split" --batch-size 1 --json
done
