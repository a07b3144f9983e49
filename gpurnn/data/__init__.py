"""Data: text files -> HDF5 corpus files (`prepare_corpus`), corpora (`open_corpus`, `corpus_from_text`,
`demo_corpus`), and the stateful truncated-BPTT minibatch stream (`BPTTStream`).

This package never imports the model or training code.
"""

from .corpus import Corpus, CorpusSplit, corpus_from_text, demo_corpus, open_corpus
from .prepare import prepare_corpus
from .stream import BPTTStream
from .vocab import Vocab

__all__ = ["BPTTStream", "Corpus", "CorpusSplit", "Vocab", "corpus_from_text", "demo_corpus",
           "open_corpus", "prepare_corpus"]
