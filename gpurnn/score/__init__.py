"""Scoring sentences with a trained model: the Python API (`Scorer`, `score_sentences`) behind
`gpurnn score`, n-best rescoring and minimal pairs (`gpurnn.score.command`)."""

from .sentences import Scorer, SentenceScore, Totals, score_sentences, sentence_tokens

__all__ = ["Scorer", "SentenceScore", "Totals", "score_sentences", "sentence_tokens"]
