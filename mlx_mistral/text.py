"""What every tokenizer gives the rest of the runtime (TextTokenizer), and what is built on it
alone: the streaming detokenizer and a tool call.

Two kinds implement it: tokenizer.Tokenizer (Mistral's vocabularies, chat encoded by
mistral-common: tools and reasoning) and template_tokenizer.TemplateTokenizer (any other model's
vocabulary run by Hugging Face `tokenizers`, chat rendered from the model's Jinja template).
"""

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import MistralError

# OpenAI chat format: {"role": "system" | "user" | "assistant" | "tool", "content": str, ...},
# assistant "tool_calls" [{"id", "type": "function", "function": {"name", "arguments": JSON str}}],
# tool messages with "tool_call_id".
Message = dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for."""

    id: str  # 9 letters/digits, as Mistral's tool results refer to it
    name: str
    arguments: str  # a JSON object, as text (OpenAI's convention)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class TextTokenizer(Protocol):
    """The tokenizer interface: text <-> ids, the special ids, each id's bytes (streaming and the
    grammar engine read them), and a chat conversation -> the prompt's ids."""

    path: Path  # the file it came from (named in errors)
    vocab_size: int
    bos_id: int
    eos_id: int  # generation stops here
    unk_id: int
    control_ids: frozenset[int]  # ids never spelled by text: no bytes, named by piece()
    space_prefix: bool  # SentencePiece's dummy prefix: a space before the text, dropped when decoding
    tool_calls_id: int | None  # the id that opens the model's tool calls, if it has them
    think_ids: tuple[int, int] | None  # the ids around a reasoning model's reasoning

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text to ids (control tokens are never produced from text); `bos`: as a prompt
        starts, with BOS where the tokenizer puts one."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, i: int) -> str:
        """Id i as the vocabulary spells it (a control token's name)."""

    @property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for (control tokens: none)."""

    def chat_tokens(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
                    reasoning: bool = False) -> list[int]:
        """A conversation (OpenAI format) ending with a user turn, ready for the answer."""

    def parse_tool_calls(self, ids: Sequence[int]) -> list[ToolCall] | None:
        """The tool calls in generated ids, or None if they are plain text."""


def check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MistralError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None


class StreamingDetokenizer:
    """Turns ids into text piece by piece, never splitting a UTF-8 character.

    Joining everything it returns gives tokenizer.decode(ids): SentencePiece's
    leading space is dropped once at the start of the stream, and kept elsewhere
    (byte-level vocabularies such as Tekken keep every space).
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._pieces = tokenizer.piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer.space_prefix

    def add(self, token: int) -> str:
        text = self._utf8.decode(self._pieces[token])
        if self._at_start and text:
            self._at_start = False
            text = text[1:] if text.startswith(" ") else text
        return text

    def flush(self) -> str:
        """Whatever is left (an incomplete UTF-8 sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
