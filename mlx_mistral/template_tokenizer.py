"""Any other model's tokenizer (SmolLM2's: a GGUF file's byte-level BPE, or a Hugging Face
directory's tokenizer.json): Hugging Face `tokenizers` runs the vocabulary, and the model's own
Jinja chat template, rendered in jinja2's sandbox as transformers renders it, writes the
conversation. Implements text.TextTokenizer.
"""

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import sentencepiece as spm
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MistralError
from .text import Message, ToolCall, check_unicode
from .tokenizer import sentencepiece_bytes


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


class TemplateTokenizer:
    """`hf` encodes and decodes; `chat_template` (Jinja) renders conversations. `add_bos`: prompts
    begin with BOS (the file's add-BOS flag). The vocabulary is byte-level (GPT-2's alphabet)."""

    space_prefix = False  # byte-level: every space is its own
    tool_calls_id = None  # tool calls are Mistral's format (tokenizer.Tokenizer)
    think_ids = None

    def __init__(self, path: Path, hf: tokenizers.Tokenizer, chat_template: str | None, *, bos_id: int,
                 eos_id: int, unk_id: int, add_bos: bool, control_ids: frozenset[int]):
        self.path, self._template_source = path, chat_template
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.unk_id, self.add_bos = bos_id, eos_id, unk_id, add_bos
        self.control_ids = control_ids
        self._chat = hf  # rendered templates: their control tokens' names are the tokens
        self._text = tokenizers.Tokenizer.from_str(hf.to_str())
        self._text.encode_special_tokens = True  # "<|im_start|>" typed in text stays text

    def encode(self, text: str, bos: bool = False) -> list[int]:
        check_unicode(text)
        ids = self._text.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._chat.decode(list(ids), skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self._chat.id_to_token(i)

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        table = byte_decoder()
        out = []
        for i in range(self.vocab_size):
            piece = self._chat.id_to_token(i) or ""
            if i in self.control_ids:
                out.append(b"")
            elif all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:  # an added token written as plain text
                out.append(piece.encode())
        return out

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self._template_source:
            raise MistralError(f"{self.path}: the model has no chat template (tokenizer.chat_template): "
                               "send a plain prompt (completions) instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self._template_source)
        except jinja2.TemplateError as e:
            raise MistralError(f"{self.path}: the chat template does not parse ({e})") from None

    def chat_tokens(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
                    reasoning: bool = False) -> list[int]:
        """The conversation rendered by the model's template (as transformers'
        apply_chat_template(add_generation_prompt=True) renders it), then tokenized with the
        template's control tokens as tokens."""
        if tools:
            raise MistralError(f"{self.path}: tools need a Mistral model (its [TOOL_CALLS] format); "
                               "this model's chat template is used without them")
        if reasoning:
            raise MistralError(f"{self.path}: no [THINK] and [/THINK] tokens: not a reasoning model")
        if not isinstance(messages, Sequence) or not all(isinstance(m, dict) for m in messages):
            raise MistralError("chat messages: expected a list of {'role': ..., 'content': ...} objects")
        last = next((m.get("role") for m in reversed(messages) if m.get("role") != "system"), None)
        if last not in ("user", "tool"):
            raise MistralError("chat messages: the conversation must end with a user message (or tool results)")
        plain = [{**m, "content": _text_content(m.get("content"))} for m in messages]
        tokens = {f"{name}_token": self.piece(i) for name, i in
                  (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id))}
        try:
            text = self._template.render(messages=plain, add_generation_prompt=True, **tokens)
        except jinja2.TemplateError as e:
            raise MistralError(f"chat messages: the model's chat template refused them ({e})") from None
        return self._encode_rendered(text)

    def _encode_rendered(self, text: str) -> list[int]:
        """A rendered conversation's ids, its control tokens' names as those tokens."""
        return self._chat.encode(text, add_special_tokens=False).ids

    def parse_tool_calls(self, ids: Sequence[int]) -> list[ToolCall] | None:
        return None


class SentencePieceTemplateTokenizer(TemplateTokenizer):
    """A SentencePiece vocabulary that is not Mistral's (Llama 2's, TinyLlama's GGUF), run by
    SentencePiece itself, as llama.cpp's tokenizer matches it. A rendered conversation is cut at its
    control tokens' names and each text between them encoded with SentencePiece's dummy-prefix
    space, as llama.cpp does (llama-vocab.cpp: a space after every control token); transformers'
    GGUF tokenizer (prepend_scheme "first") puts it only at the start, and merges a leading run of
    spaces otherwise: it is not the reference here."""

    space_prefix = True

    def __init__(self, path: Path, sp: "spm.SentencePieceProcessor", chat_template: str | None, *, bos_id: int,
                 eos_id: int, unk_id: int, add_bos: bool):
        self.path, self._template_source, self._sp = path, chat_template, sp
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id, self.add_bos = bos_id, eos_id, unk_id, add_bos
        self.control_ids = frozenset(i for i in range(self.vocab_size) if sp.is_control(i))
        self._control = {sp.id_to_piece(i): i for i in self.control_ids}
        names = sorted(self._control, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        check_unicode(text)
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        return sentencepiece_bytes(self._sp)

    def _encode_rendered(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text) if self._split else [text]:
            ids += [self._control[part]] if part in self._control else self._sp.encode(part) if part else []
        return ids


def byte_level_json(path: Path) -> bool:
    """Whether a tokenizer.json is a byte-level BPE that is not Mistral's (a Tekken one has [INST]
    as token 3): what read_tokenizer_json runs. SentencePiece-style ones are Mistral's (tokenizer.py)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        byte_level = data["model"]["type"] == "BPE" and not data["model"].get("byte_fallback")
        added = {t["id"]: t["content"] for t in data.get("added_tokens") or []}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MistralError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    return byte_level and added.get(3) != "[INST]"


def read_tokenizer_json(path: Path) -> TemplateTokenizer:
    """A Hugging Face directory's tokenizer: tokenizer.json, and beside it tokenizer_config.json
    (bos/eos/unk tokens; a missing bos or unk is the eos token, as GPT-2's are) and the chat
    template (chat_template.jinja, as transformers 5 saves it, else tokenizer_config.json's).
    BOS starts a prompt where the tokenizer's own post-processor puts it (as transformers encodes)."""
    hf = tokenizers.Tokenizer.from_file(str(path))
    config_file, jinja_file = path.with_name("tokenizer_config.json"), path.with_name("chat_template.jinja")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.exists() else config.get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistralError(f"{config_file}: not readable JSON ({type(e).__name__}: {e})") from None

    def token_id(name: str) -> int | None:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and hf.token_to_id(token) is None:
            raise MistralError(f"{config_file}: {name} {token!r} is not in {path.name}")
        return None if token is None else hf.token_to_id(token)

    eos = token_id("eos_token")
    if eos is None:
        raise MistralError(f"{config_file}: no eos_token (generation would never stop)")
    bos = token_id("bos_token")
    bos, unk = eos if bos is None else bos, token_id("unk_token")
    control = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)
    add_bos = hf.encode("a").ids[:1] == [bos] and hf.encode("a", add_special_tokens=False).ids[:1] != [bos]
    if isinstance(template, list):  # named templates: transformers' chat uses "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return TemplateTokenizer(path, hf, template if isinstance(template, str) else None, bos_id=bos, eos_id=eos,
                             unk_id=eos if unk is None else unk, add_bos=add_bos, control_ids=control)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _text_content(content: object) -> str:
    """A message's content as the one string templates expect (OpenAI's text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        check_unicode(content)
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_text_content(p.get("text")) for p in content)
    raise MistralError("chat messages: content must be a string or a list of text parts")
