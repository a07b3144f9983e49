#!/usr/bin/env bash
# Issue 4's result: an Elman RNN on full Penn Treebank (model: scripts/ptb_rnn.toml), trained with
# Adam in three stages of falling learning rate, then scored on valid and test with --batch-size 1
# (one exact left-to-right pass). A checkpoint is written every 200 iterations: run the script
# again after a stop and it resumes where it stopped (bit-identically on NumPy).
# Usage: bash scripts/train_ptb_rnn.sh [RUN_DIR]   (PTB from $GPURNN_PTB_DIR, default ../shared/data/ptb)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ptb="${GPURNN_PTB_DIR:-$repo/../shared/data/ptb}"
run="${1:-$repo/runs/ptb-rnn}"
mkdir -p "$run"
[ -f "$run/ptb.h5" ] || gpurnn prepare "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" \
    --test "$ptb/ptb.test.txt" --output "$run/ptb.h5"

train() {  # train EPOCHS LR: continue (or start) the run up to EPOCHS epochs at learning rate LR
    local resume=""
    [ -f "$run/checkpoint.h5" ] && resume="--resume"
    gpurnn --backend numpy train "$run/ptb.h5" --model-config "$repo/scripts/ptb_rnn.toml" \
        --optimizer adam --clip 0.5 --lr-decay 0.25 --batch-size 20 --time-size 35 --eval-every 1327 \
        --checkpoint "$run/checkpoint.h5" --save-every 200 --metrics "$run/metrics.jsonl" \
        --epochs "$1" --lr "$2" $resume
}
train 12 1e-3
train 17 2.5e-4
train 21 6.25e-5
for split in valid test; do
    gpurnn --backend numpy eval "$run/checkpoint.h5" "$run/ptb.h5" --split "$split" --batch-size 1 --json
done
