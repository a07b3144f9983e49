# Sourced by the Penn Treebank scripts (with $repo set to the repository root): where PTB's text
# comes from and the corpus file made from it. Penn Treebank is not shipped or downloaded here: the
# scripts read ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's preprocessed PTB, the data/
# folder of his RNNLM "simple-examples" archive) from $GPURNN_PTB_DIR, default ../shared/data/ptb
# relative to the repository root.
ptb="${GPURNN_PTB_DIR:-$repo/../shared/data/ptb}"
python="${PYTHON:-python3}"  # the interpreter: $PYTHON, else python3 on PATH

# Stop with one line unless the three text files are there.
ptb_check() {
    for split in train valid test; do
        [ -f "$ptb/ptb.$split.txt" ] || { echo "error: no $ptb/ptb.$split.txt: set GPURNN_PTB_DIR to the folder holding ptb.{train,valid,test}.txt" >&2; exit 2; }
    done
}

# Make the corpus file $1 from them, unless it exists.
ptb_prepare() {
    [ -f "$1" ] || "$python" -m gpurnn prepare "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" --test "$ptb/ptb.test.txt" \
        --output "$1"
}
