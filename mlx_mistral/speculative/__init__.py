"""Speculative decoding: cheap proposals (lookup.py, draft.py) checked by one forward of the target for
the whole batch (verify.py), kept up to the first token the target would not have drawn."""

from .draft import DraftModel, DraftRow, check_same_tokenizer, load_draft
from .lookup import (
    DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, Lookup, PromptLookup, add_arguments, from_arguments, parse_ngram,
)
from .verify import Draw, Verdict, verify
from .width import Width

__all__ = ["DEFAULT_DRAFT_TOKENS", "DEFAULT_NGRAM", "Draw", "DraftModel", "DraftRow", "Lookup",
           "PromptLookup", "Verdict", "Width", "add_arguments", "check_same_tokenizer", "from_arguments",
           "load_draft", "parse_ngram", "verify"]
