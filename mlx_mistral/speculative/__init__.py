"""Speculative decoding: cheap proposals (lookup.py) checked by one forward of the target for
the whole batch (verify.py), kept up to the first token the target would not have drawn."""

from .lookup import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, Lookup, PromptLookup, parse_ngram
from .verify import Draw, Verdict, verify

__all__ = ["DEFAULT_DRAFT_TOKENS", "DEFAULT_NGRAM", "Draw", "Lookup", "PromptLookup", "Verdict", "parse_ngram",
           "verify"]
