"""Mistral tokenizers (SentencePiece V1/V3, its tokenizer.json form, Tekken) with chat encoding
by mistral-common.

mistral-common is Mistral's own encoder for chat requests, tools included: chat_tokens()
hands it the conversation in OpenAI's message format, so our templates are never hand-written.
"""

import json
import logging
import re
import secrets
import string
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers
from mistral_common.exceptions import MistralCommonException
from mistral_common.experimental.tools import _decode_tool_calls
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1, InstructTokenizerV3
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

from .errors import MistralError
from .text import Message, ToolCall, check_unicode

class Tokenizer:
    """A Mistral vocabulary (implements text.TextTokenizer). `mistral`: one already built (from a
    GGUF file's vocabulary); else read from the file at `path`."""

    def __init__(self, path: str | Path, mistral: MistralTokenizer | None = None):
        self.path = Path(path)
        self._mistral = mistral or _load_mistral(self.path)
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.vocab_size = self._raw.n_words
        self.bos_id, self.eos_id, self.unk_id = self._raw.bos_id, self._raw.eos_id, self._raw.unk_id
        self.version = self._raw.version.value  # "v1", "v3", "v7", ...
        self.control_ids = frozenset(self._raw.special_ids)
        self.tekken = isinstance(self._raw, Tekkenizer)
        self.space_prefix = not self.tekken  # SentencePiece's dummy prefix
        self.tool_calls_id = self._raw.get_special_token("[TOOL_CALLS]") if self.version != "v1" else None
        begin, end = self.control_id("[THINK]"), self.control_id("[/THINK]")
        # a reasoning model's: its reasoning comes between them, before the answer
        self.think_ids = (begin, end) if begin is not None and end is not None else None

    def control_id(self, piece: str) -> int | None:
        """The id of control token `piece`, or None if the tokenizer has none (SentencePiece answers <unk>'s)."""
        try:
            i = self._raw.get_special_token(piece)
        except ValueError:
            return None
        return i if self._raw.id_to_piece(i) == piece else None

    def piece(self, i: int) -> str:
        """Id i's entry in the vocabulary, as it spells it (a control token's name: "[INST]", "</s>")."""
        return self._raw.id_to_piece(i)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text to ids. Control tokens are never produced from text."""
        check_unicode(text)
        return self._raw.encode(text, bos=bos, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._raw.decode(list(ids))

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for (control tokens: none), for streaming decode."""
        if self.tekken:
            return [self._raw.id_to_byte_piece(i, SpecialTokenPolicy.IGNORE) for i in range(self.vocab_size)]
        return sentencepiece_bytes(self._raw._model)

    def chat_tokens(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
                    reasoning: bool = False) -> list[int]:
        """chat_inputs' tokens, for a conversation without images (MistralError if it has some)."""
        tokens, images = self.chat_inputs(messages, tools, reasoning)
        if images:
            raise MistralError("chat messages: they hold images, whose pixels go with the tokens: use "
                               "Tokenizer.chat_inputs")
        return tokens

    def chat_inputs(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
                    reasoning: bool = False) -> tuple[list[int], list[np.ndarray]]:
        """Token ids of a conversation ending with a user turn (or tool results), ready for the answer,
        and its images' pixels, [height, width, 3] float32 normalized, one per image in order.

        `messages` and `tools` are in OpenAI's chat format; mistral-common encodes them, so
        V1, V3 and Tekken templates, tool definitions, calls and results are Mistral's own.
        An empty answer (EOS at once, or stopped before its first token) is left out, as
        mistral-common refuses it; the user turns around it are then joined, as it joins them.
        With `reasoning`, the model's own reasoning system prompt comes first (reasoning_prompt).
        Image parts (OpenAI's image_url, such as a data URI) are resized and normalized by
        mistral-common for the tokenizer's image settings (tekken.json's "image").
        """
        if tools and self.tool_calls_id is None:
            raise MistralError(f"{self.path}: a {self.version} tokenizer has no function calling (V3 or later needed)")
        if not isinstance(messages, Sequence) or not all(isinstance(m, dict) for m in messages):
            raise MistralError("chat messages: expected a list of {'role': ..., 'content': ...} objects")
        if reasoning:
            messages = [self.reasoning_prompt(), *messages]
        last = next((m.get("role") for m in reversed(messages) if m.get("role") != "system"), None)
        if last not in ("user", "tool"):
            raise MistralError("chat messages: the conversation must end with a user message (or tool results)")
        messages = [m for m in messages if m.get("role") != "assistant" or m.get("content") or m.get("tool_calls")]
        for m in messages:
            if isinstance(m.get("content"), str):
                check_unicode(m["content"])
        try:
            request = ChatCompletionRequest.from_openai(messages, tools=list(tools) if tools else None)
            encoded = self._mistral.encode_chat_completion(request)
            return encoded.tokens, [image.transpose(1, 2, 0) for image in encoded.images]
        except KeyError as e:
            raise MistralError(f"chat messages: a message lacks its {e} field") from None
        except (MistralCommonException, ValueError, TypeError) as e:  # pydantic errors are ValueErrors
            reason = " ".join(str(e).split())
            raise MistralError(f"chat messages: {reason[:300]}") from None

    def reasoning_prompt(self) -> Message:
        """The system message that turns a reasoning model's reasoning on: the model's own
        SYSTEM_PROMPT.txt (beside its tokenizer, as Magistral's repos ship it), its
        [THINK]...[/THINK] part a thinking chunk, as the model cards load it for mistral-common."""
        if self.think_ids is None:
            raise MistralError(f"{self.path}: no [THINK] and [/THINK] tokens: not a reasoning model")
        file = self.path.parent / "SYSTEM_PROMPT.txt"
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MistralError(f"{file}: cannot read the model's reasoning system prompt ({e})") from None
        parts = re.fullmatch(r"(.*?)\[THINK\](.*?)\[/THINK\](.*)", text, re.DOTALL)
        if parts is None:
            return {"role": "system", "content": text}
        chunks = [{"type": "text", "text": parts[1]}, {"type": "thinking", "thinking": parts[2], "closed": True},
                  {"type": "text", "text": parts[3]}]
        return {"role": "system", "content": [c for c in chunks if c.get("text") != ""]}

    def parse_tool_calls(self, ids: Sequence[int]) -> list[ToolCall] | None:
        """The calls in generated ids that begin with [TOOL_CALLS]; None if there are none or they
        do not parse (then the ids are plain text)."""
        ids = [i for i in ids if i != self.eos_id]
        if self.tool_calls_id is None or not ids or ids[0] != self.tool_calls_id:
            return None
        parts, part = [], []
        for i in ids:  # one part per [TOOL_CALLS], as mistral-common's decoder takes them
            if i == self.tool_calls_id and part:
                parts.append(part)
                part = []
            part.append(i)
        try:
            calls = _decode_tool_calls(parts + [part], self._raw)
        except (ValueError, TypeError):  # malformed JSON, a missing name or arguments
            return None
        return [ToolCall(id=_call_id(c.id), name=c.function.name, arguments=c.function.arguments) for c in calls]


def _call_id(given: str) -> str:
    """The model's call id if it is a valid one, else a new random one (Mistral's 9 alphanumerics)."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", given or ""):
        return given
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def sentencepiece_bytes(sp: "spm.SentencePieceProcessor | _SentencePieceJson") -> list[bytes]:
    """The bytes each SentencePiece id stands for: control tokens none, <unk> U+2047, byte pieces
    ("<0xAB>") their byte, others their text with U+2581 as a space."""
    out = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(b"" if sp.is_control(i) else "\u2047".encode())
        elif sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def _load_mistral(path: Path) -> MistralTokenizer:
    """mistral-common's tokenizer for a file. A SentencePiece model whose file name does not say
    its version (tokenizer.model, tokenizer.json) is V3 when [INST] is a control token, else V1."""
    if is_tekken(path):
        try:
            return MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
        except (OSError, ValueError, KeyError, AssertionError, MistralCommonException) as e:
            raise MistralError(f"{path}: not a Tekken tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    if path.name == "tokenizer.json":
        sp = _SentencePieceJson(path)
    else:
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise MistralError(f"{path}: not a SentencePiece tokenizer model ({reason})") from None
        if re.search(r"\.v\d+(m\d+)?$", path.name):  # its name says its version (v7m1: v7, multimodal)
            return MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    return sentencepiece_mistral(path, sp, in_memory=isinstance(sp, _SentencePieceJson))


def sentencepiece_mistral(path: Path, sp: "spm.SentencePieceProcessor | _SentencePieceJson",
                          in_memory: bool = True) -> MistralTokenizer:
    """mistral-common's tokenizer of a SentencePiece vocabulary: V3 when [INST] is a control
    token, else V1. `in_memory`: `sp` is used as it is (a tokenizer.json's, a GGUF file's),
    not read again from `path`."""
    v3 = sp.vocab_size() > 4 and sp.id_to_piece(3) == "[INST]" and sp.is_control(3)
    version = TokenizerVersion.v3 if v3 else TokenizerVersion.v1
    raw = (_InMemorySentencePieceTokenizer(path, sp, version) if in_memory
           else SentencePieceTokenizer(path, tokenizer_version=version))
    instruct = (InstructTokenizerV3 if v3 else InstructTokenizerV1)(raw)
    return MistralTokenizer(instruct, validator=get_validator(version, mode=ValidationMode.test),
                            request_normalizer=get_normalizer(version, raw.model_settings_builder))


class _SentencePieceJson:
    """A tokenizer.json converted from a SentencePiece BPE model (what transformers and mlx-lm
    write), run by Hugging Face `tokenizers` with SentencePiece's rules so that the ids are
    SentencePiece's, behind the methods mistral-common calls on a SentencePieceProcessor."""

    def __init__(self, path: Path):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            sentencepiece_like = model["type"] == "BPE" and model.get("byte_fallback") and "\u2581" in model["vocab"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise MistralError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
        if not sentencepiece_like and model["type"] == "BPE":
            raise MistralError(f"{path}: a byte-level BPE (a Tekken model's, as older mlx_lm.convert outputs "
                               "hold), whose chat format version it does not record: put the model's tekken.json "
                               "beside it")
        if not sentencepiece_like:
            raise MistralError(f"{path}: not a SentencePiece-style BPE (byte fallback, '\u2581' spaces)")

        def spaces_only(merge: str | list[str]) -> bool:
            return set("".join(merge.split(" ") if isinstance(merge, str) else merge)) == {"\u2581"}

        # SentencePiece scores the pieces made only of spaces lowest: it merges them last.
        model["merges"] = sorted(model["merges"], key=spaces_only)
        data["normalizer"] = data["pre_tokenizer"] = None
        self._hf = tokenizers.Tokenizer.from_str(json.dumps(data))
        n = tokenizers.normalizers
        self._hf.normalizer = n.Sequence([n.Prepend("\u2581"), n.Replace(" ", "\u2581")])  # its dummy prefix
        # its words: a run of spaces with the text after it (a space run at the end stands alone)
        self._hf.pre_tokenizer = tokenizers.pre_tokenizers.Split(
            tokenizers.Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")
        self._hf.encode_special_tokens = True  # "[INST]" typed in text stays text
        self._unk = self._hf.token_to_id("<unk>")
        self._control = {t["id"] for t in data.get("added_tokens", []) if t.get("special")} - {self._unk}

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=True)

    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    get_piece_size = vocab_size

    def id_to_piece(self, i: int) -> str:
        return self._hf.id_to_token(i)

    def piece_to_id(self, piece: str) -> int:
        found = self._hf.token_to_id(piece)
        return self._unk if found is None else found

    def is_control(self, i: int) -> bool:
        return i in self._control

    IsControl = is_control

    def is_unknown(self, i: int) -> bool:
        return i == self._unk

    def is_byte(self, i: int) -> bool:
        return re.fullmatch(r"<0x[0-9A-F]{2}>", self.id_to_piece(i)) is not None

    def bos_id(self) -> int:
        return self.piece_to_id("<s>")

    def eos_id(self) -> int:
        return self.piece_to_id("</s>")

    def unk_id(self) -> int:
        return self._unk

    def pad_id(self) -> int:
        return -1


class _InMemorySentencePieceTokenizer(SentencePieceTokenizer):
    """mistral-common's SentencePieceTokenizer on a SentencePiece model already built (a
    _SentencePieceJson, or a processor of a GGUF file's vocabulary) instead of a .model file."""

    def __init__(self, path: Path, model: "spm.SentencePieceProcessor | _SentencePieceJson",
                 version: TokenizerVersion):
        # what SentencePieceTokenizer.__init__ sets, without its SentencePieceProcessor
        self._logger = logging.getLogger(self.__class__.__name__)
        self._model = model
        self._vocab = [model.id_to_piece(i) for i in range(model.vocab_size())]
        self._version = version
        self._file_path = path
