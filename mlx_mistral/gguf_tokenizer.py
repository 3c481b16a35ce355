"""A GGUF file's tokenizer, rebuilt from its metadata (tokenizer.ggml.*; key names: gguf.Keys).

Mistral's vocabularies get mistral-common's tokenizer, so that tools and reasoning keep working:
- SentencePiece (`tokenizer.ggml.model` "llama") is Mistral's when [INST] is control token 3
  (V3: Mistral 7B v0.3, Mixtral 8x22B, Codestral) or when the file's chat template speaks [INST]
  (V1: Mistral 7B v0.1/v0.2, Mixtral 8x7B). The pieces, scores and types are SentencePiece's own
  (llama.cpp copies them, and its token types are SentencePiece's numbers), so the model proto is
  rebuilt from them and SentencePiece itself runs it.
- Tekken (byte-level BPE, "gpt2", with `tokenizer.ggml.pre` "tekken"): its leading control tokens
  are the special tokens, the rest the ranked byte pieces in GPT-2's alphabet. GGUF does not record
  the instruct version, so the control tokens choose it: [THINK] -> v13, [ARGS] with [CALL_ID] ->
  v11; else the chat template: one that writes [SYSTEM_PROMPT] -> v7 (every Tekken vocabulary
  holds that token, NeMo's v3 too), else v3.
Any other byte-level BPE (SmolLM2's) is run by `tokenizers` with the file's pre-tokenizer and its
Jinja chat template (template_tokenizer.TemplateTokenizer); any other SentencePiece vocabulary
(Llama 2's, TinyLlama's) by SentencePiece with its template (SentencePieceTemplateTokenizer).
Anything else is refused by name.
"""

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
import sentencepiece as spm
import tokenizers
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from sentencepiece import sentencepiece_model_pb2

from .errors import MistralError
from .template_tokenizer import SentencePieceTemplateTokenizer, TemplateTokenizer, byte_decoder
from .text import TextTokenizer
from .tokenizer import Tokenizer, sentencepiece_mistral

T = gguf.Keys.Tokenizer
CONTROL = gguf.TokenType.CONTROL
# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) as `tokenizers` pieces placed before the
# byte-level step, whose own regex is GPT-2's; "smollm" first splits every digit (llama.cpp's
# "\p{N}" pass, `tokenizers`' individual Digits).
PRE_TOKENIZERS = {"gpt-2": [], "default": [], "smollm": [tokenizers.pre_tokenizers.Digits(individual_digits=True)]}
# Tekken's split (the same in every tekken.json mistral-common ships)
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(path: Path, meta: dict[str, Any]) -> TextTokenizer:
    """The tokenizer of the GGUF file at `path`, from its metadata `meta` (read_gguf's)."""
    model, tokens = meta.get(T.MODEL), meta.get(T.LIST)
    if model is None or not isinstance(tokens, list) or not tokens:
        raise MistralError(f"{path}: no tokenizer in the file ({T.MODEL} and {T.LIST} are needed)")
    types = [int(t) for t in (meta[T.TOKEN_TYPE].tolist() if T.TOKEN_TYPE in meta else [1] * len(tokens))]
    if len(types) != len(tokens):
        raise MistralError(f"{path}: {T.TOKEN_TYPE} has {len(types)} entries, {T.LIST} {len(tokens)}")
    pre = meta.get(T.PRE, "default")
    if model == "gpt2" and pre == "tekken":
        return Tokenizer(path, _tekken(path, tokens, types, meta.get(T.CHAT_TEMPLATE) or ""))
    if model == "gpt2":
        return _byte_level(path, meta, tokens, types, pre)
    if model == "llama":
        mistral = (len(tokens) > 4 and tokens[3] == "[INST]" and types[3] == CONTROL) or \
                  "[INST]" in (meta.get(T.CHAT_TEMPLATE) or "")
        sp = _sentencepiece(path, meta, tokens, types)
        if not mistral:
            return SentencePieceTemplateTokenizer(path, sp, meta.get(T.CHAT_TEMPLATE),
                                                  **_special_ids(path, meta, len(tokens)))
        return Tokenizer(path, sentencepiece_mistral(path, sp))
    raise MistralError(f"{path}: {T.MODEL} {model!r} is not supported (expected 'llama' or 'gpt2')")


def _byte_level(path: Path, meta: dict[str, Any], tokens: list[str], types: list[int], pre: str) -> TextTokenizer:
    if pre not in PRE_TOKENIZERS:
        raise MistralError(f"{path}: {T.PRE} {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)}, tekken)")
    merges = meta.get(T.MERGES)
    if not isinstance(merges, list):
        raise MistralError(f"{path}: a byte-level BPE vocabulary without its {T.MERGES}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs, ignore_merges=False))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [*PRE_TOKENIZERS[pre], tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = tokenizers.decoders.ByteLevel()
    control = frozenset(i for i, t in enumerate(types) if t == CONTROL)
    specials = [tokenizers.AddedToken(tokens[i], special=True, normalized=False) for i in sorted(control)]
    hf.add_special_tokens(specials)
    return TemplateTokenizer(path, hf, meta.get(T.CHAT_TEMPLATE), control_ids=control, **_special_ids(path, meta, len(tokens)))


def _special_ids(path: Path, meta: dict[str, Any], n: int) -> dict[str, Any]:
    ids = {"bos_id": meta.get(T.BOS_ID), "eos_id": meta.get(T.EOS_ID), "unk_id": meta.get(T.UNK_ID, 0)}
    for name, i in ids.items():
        if not isinstance(i, int) or not 0 <= i < n:
            raise MistralError(f"{path}: the tokenizer's {name.removesuffix('_id')} id must be one of its {n} "
                               f"tokens, got {i!r}")
    return ids | {"add_bos": bool(meta.get(T.ADD_BOS, True))}


def _sentencepiece(path: Path, meta: dict[str, Any], tokens: list[str], types: list[int]) -> spm.SentencePieceProcessor:
    """The SentencePiece BPE model the file's pieces, scores and types come from."""
    scores = meta[T.SCORES].tolist() if T.SCORES in meta else [0.0] * len(tokens)
    ids = _special_ids(path, meta, len(tokens))
    proto = sentencepiece_model_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = trainer.BPE, len(tokens), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = ids["unk_id"], ids["bos_id"], ids["eos_id"], -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = (tokens[ids[k]] for k in ("unk_id", "bos_id", "eos_id"))
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", bool(meta.get(T.ADD_PREFIX, True))
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind)  # GGUF's token types are SentencePiece's
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except RuntimeError as e:
        raise MistralError(f"{path}: the SentencePiece vocabulary does not load ({str(e).strip()[:200]})") from None
    return sp


def _tekken(path: Path, tokens: list[str], types: list[int], template: str) -> MistralTokenizer:
    """mistral-common's Tekken tokenizer of the vocabulary, through the tekken.json it reads."""
    n_special = next((i for i, t in enumerate(types) if t != CONTROL), len(types))
    table = byte_decoder()
    try:
        vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes(table[c] for c in t)).decode(), "token_str": None}
                 for i, t in enumerate(tokens[n_special:])]
    except KeyError as e:
        raise MistralError(f"{path}: a Tekken piece has a character outside the byte-level alphabet ({e})") from None
    names = set(tokens[:n_special])
    version = ("v13" if "[THINK]" in names else "v11" if {"[ARGS]", "[CALL_ID]"} <= names
               else "v7" if "[SYSTEM_PROMPT]" in template else "v3")
    data = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": len(tokens),
                       "default_num_special_tokens": n_special, "version": version},
            "vocab": vocab,
            "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(tokens[:n_special])]}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tekken.json"
        file.write_text(json.dumps(data), encoding="utf-8")
        try:
            return MistralTokenizer.from_file(str(file), mode=ValidationMode.test)
        except (ValueError, KeyError, AssertionError) as e:
            raise MistralError(f"{path}: not a Tekken vocabulary mistral-common reads ({str(e)[:200]})") from None
