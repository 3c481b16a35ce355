"""OpenAI's logprobs: what a request asks for, and its Events' TokenLogprobs (request.py says
which distribution they come from) as /v1/chat/completions and /v1/completions return them.

A token is named by its text (its bytes as UTF-8; bytes that are not whole characters as
"bytes:\\xe2\\x80", OpenAI's spelling); a control token, which has no text, by its name in the
vocabulary ("[TOOL_CALLS]", "[THINK]") with `bytes` null. Every generated token has one entry,
in order, except the EOS that ends an answer (OpenAI lists none for it).
"""

from ..text import StreamingDetokenizer, TextTokenizer
from .http import APIError
from .request import Event, TokenLogprob


def requested(body, kind: str) -> int | None:
    """How many most likely tokens a request wants beside each chosen one (None: no logprobs).
    Chat: `logprobs: true` and `top_logprobs` (0 to 20, needs logprobs); completions:
    `logprobs` N (0 to 20, where OpenAI stops at 5). The ranges are the schemas'."""
    if kind == "text":
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def token_name(tokenizer: TextTokenizer, token: int) -> tuple[str, list[int] | None]:
    """(the token as OpenAI names it, its bytes: None for a control token)."""
    if token in tokenizer.control_ids:
        return tokenizer.piece(token), None
    raw = tokenizer.piece_bytes[token]
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


class Logprobs:
    """One answer's logprobs in the shape of `kind` ("chat" or "text"): add() each Event, take()
    the object of the tokens added since the last take (a streamed chunk's, or the whole answer's)."""

    def __init__(self, kind: str, tokenizer: TextTokenizer):
        self.kind, self.tokenizer = kind, tokenizer
        self.pending: list[TokenLogprob] = []
        self._text = StreamingDetokenizer(tokenizer)  # completions' text_offset
        self._offset = 0

    def add(self, event: Event) -> None:
        if event.logprob is not None and event.token != self.tokenizer.eos_id:
            self.pending.append(event.logprob)

    def take(self) -> dict:
        pending, self.pending = self.pending, []
        return self._chat(pending) if self.kind == "chat" else self._text_completion(pending)

    def whole(self, events: list[Event]) -> dict:
        for event in events:
            self.add(event)
        return self.take()

    def _chat(self, logprobs: list[TokenLogprob]) -> dict:
        """{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
        "refusal": None}"""
        def entry(token: int, logprob: float) -> dict:
            name, raw = token_name(self.tokenizer, token)
            return {"token": name, "logprob": logprob, "bytes": raw}

        content = [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                   for lp in logprobs]
        return {"content": content, "refusal": None}

    def _text_completion(self, logprobs: list[TokenLogprob]) -> dict:
        """The legacy shape: parallel lists; each top_logprobs dict has the top N and the chosen
        token (up to N + 1 entries, as OpenAI's); text_offset is where each token's text begins
        in the answer's decoded tokens, counted on across the chunks of a stream."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            top = {token_name(self.tokenizer, t)[0]: v for t, v in lp.top}
            name = token_name(self.tokenizer, lp.token)[0]
            out["tokens"].append(name)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top | {name: lp.logprob})
            out["text_offset"].append(self._offset)
            self._offset += len(self._text.add(lp.token))
        return out
