"""SentencePiece tokenizer, Mistral chat templates (V1 and V3), streaming detokenizer."""

import codecs
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from .errors import MistralError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise MistralError(f"{self.path}: not a SentencePiece tokenizer model ({reason})") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        # V3 (Mistral v0.3) has [INST] / [/INST] as control tokens 3 and 4.
        self.inst_ids = None
        if self.vocab_size > 4 and self._sp.id_to_piece(3) == "[INST]" and self._sp.is_control(3):
            self.inst_ids = (3, 4)
        self.version = "v3" if self.inst_ids else "v1"

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text to ids. Control tokens are never produced from text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MistralError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        return ([self.bos_id] if bos else []) + self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for (control tokens: none), for streaming decode."""
        out = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                out.append(b"" if self._sp.is_control(i) else "\u2047".encode())
            elif self._sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))  # "<0xAB>"
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation ending with a user turn, ready for the answer.

        V1: <s>[INST] user [/INST] answer</s>[INST] user2 [/INST], "[INST]" as plain text,
            a system prompt prepended to the first user message with a blank line.
        V3: [1, 3] + enc(user) + [4] + enc(answer) + [2], system prompt in the last user message.
        """
        system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
        turns = [m for m in messages if m.get("role") != "system"]
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != expected or not isinstance(m.get("content"), str):
                raise MistralError(
                    f"chat message {i}: expected role '{expected}' with text content, got {m.get('role')!r}"
                )
        if not turns or turns[-1]["role"] != "user":
            raise MistralError("chat messages: the conversation must end with a user message")
        n_users = (len(turns) + 1) // 2
        ids = [self.bos_id]
        for i, m in enumerate(turns):
            if m["role"] == "assistant":
                ids += self.encode(m["content"]) + [self.eos_id]
                continue
            text, user_index = m["content"], i // 2
            system_here = user_index == 0 if self.inst_ids is None else user_index == n_users - 1
            if system and system_here:
                text = system + "\n\n" + text
            if self.inst_ids is None:
                ids += self.encode(f"[INST] {text} [/INST]")
            else:
                ids += [self.inst_ids[0]] + self.encode(text) + [self.inst_ids[1]]
        return ids


class StreamingDetokenizer:
    """Turns ids into text piece by piece, never splitting a UTF-8 character.

    Joining everything it returns gives tokenizer.decode(ids): SentencePiece's
    leading space is dropped once at the start of the stream, and kept elsewhere.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._pieces = tokenizer.piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def add(self, token: int) -> str:
        text = self._utf8.decode(self._pieces[token])
        if self._at_start and text:
            self._at_start = False
            text = text[1:] if text.startswith(" ") else text
        return text

    def flush(self) -> str:
        """Whatever is left (an incomplete UTF-8 sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
