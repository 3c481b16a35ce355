"""Chat sessions for the app: history -> prompt tokens, KV cache reuse, streaming, Stop.

Plain Python over the public mlx_mistral API (no Gradio here), so every rule is unit-tested.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mlx_mistral import MistralError, RollingKVCache, make_sampler, stream_generate
from mlx_mistral.scheduler import Scheduler

# The one model and the one MLX thread (mlx_mistral/scheduler.py): the app's tabs share it.
Engine = Scheduler


@dataclass
class Settings:
    """The knobs of one answer (the app's sliders)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    repetition_penalty: float = 1.0
    seed: int | None = 0


@dataclass
class TurnStats:
    prompt_tokens: int  # prefilled this turn
    reused_tokens: int  # already in the cache: not prefilled again
    conversation_tokens: int  # fed to the cache since it was made (its offset)
    generated_tokens: int
    generation_tps: float
    ttft: float  # seconds
    peak_memory: int  # bytes
    kv_bytes: int  # allocated once, fixed
    kv_capacity: int  # slots (tokens)
    kv_tokens: int  # slots in use
    window: int | None  # the model's sliding window
    finish_reason: str | None  # "stop" (EOS), "length", "stopped" (Stop button); None while streaming
    turn: int = 0  # answers this session has generated, this one included

    @property
    def kv_used_bytes(self) -> int:
        return self.kv_bytes * self.kv_tokens // self.kv_capacity

    @property
    def rolled(self) -> bool:
        """The conversation no longer fits: the cache keeps only its last kv_capacity tokens."""
        return self.conversation_tokens > self.kv_capacity


class ChatSession:
    """One browser session: its rolling KV cache and the exact tokens the cache holds.

    A conversation's answers stay the tokens the model generated. chat_tokens() re-encodes
    answers from their text, and SentencePiece often splits that text differently, so the
    session keeps both forms: `tokens` (exactly what the cache was fed) and `template` (the
    same conversation as chat_tokens() writes it), with `marks`, their lengths at the end
    of each answer. A new prompt from chat_tokens() is translated at the last mark it
    shares with `template`: the model's own tokens up to there, the prompt's after.

    The reuse rule: when that prompt starts with everything the cache holds, only the rest
    is prefilled; otherwise (edit, regenerate, undo, clear, system prompt changed) a fresh
    cache is made and all of it is prefilled. Either way the model sees the same tokens.
    """

    def __init__(self, engine: Engine, reuse: bool = True):
        self.engine = engine
        self.reuse = reuse
        self.stats: TurnStats | None = None
        self.turns = 0
        self.free()

    def plan(self, messages: Sequence[dict]) -> tuple[list[int], bool]:
        """(the tokens to feed, whether they continue the cache) for `messages`."""
        feed, reused, _, _ = self._plan(self.engine.tokenizer.chat_tokens(messages))
        return feed, reused

    def _plan(self, prompt: list[int]) -> tuple[list[int], bool, list[int], int]:
        """plan(), plus the whole prompt with the model's own answer tokens and the mark used."""
        for i in reversed(range(len(self.marks))):  # marks[0] = (0, 0) always matches
            t, x = self.marks[i]
            if prompt[:t] == self.template[:t]:
                break
        ids = self.tokens[:x] + prompt[t:]
        n = len(self.tokens)
        reused = self.reuse and self.cache is not None and n < len(ids) and ids[:n] == self.tokens
        return (ids[n:] if reused else ids), reused, ids, i

    def respond(self, messages: Sequence[dict], settings: Settings) -> Iterator[tuple[str, TurnStats]]:
        """Stream the answer to `messages` (the last one from the user): (text so far, stats).

        Closing the iterator (the Stop button) stops generation at once; the cache then
        holds the prompt and the tokens received so far, and the partial answer counts
        as the assistant's turn in the next prompt. (If the browser missed the last of
        them, its history no longer matches the cache, which is then rebuilt.)
        """
        engine, tokenizer = self.engine, self.engine.tokenizer
        sampler = engine.call(make_sampler, settings.temperature, settings.top_p, seed=settings.seed)  # MLX: its thread
        with engine.lock:
            self.turns += 1
            prompt = tokenizer.chat_tokens(messages)
            feed, reused, ids, mark = self._plan(prompt)
            marks = self.marks[: mark + 1]
            if not reused:
                self.free()
                self.cache = engine.new_cache()
            start = len(self.tokens)
            stream = stream_generate(
                engine.model, tokenizer, feed, max_tokens=int(settings.max_tokens), sampler=sampler,
                repetition_penalty=settings.repetition_penalty, cache=self.cache,
            )
            answer: list[int] = []
            text, last = "", None
            try:
                while (r := engine.call(next, stream, None)) is not None:
                    last = r
                    answer.append(r.token)
                    text += r.text
                    yield text, self._stats(r, start, len(feed), None)
            finally:
                engine.call(stream.close)
                if last is None or self.cache.offset != len(ids) + len(answer):
                    self.free()  # nothing (or not everything) reached the cache: rebuild next turn
                else:
                    eos = [tokenizer.eos_id] if answer[-1] == tokenizer.eos_id else []
                    self.template = prompt + tokenizer.encode(text) + eos
                    self.tokens = ids + answer
                    self.marks = marks + [(len(self.template), len(self.tokens))]
                    self.stats = self._stats(last, start, len(feed), last.finish_reason or "stopped")

    def _stats(self, r, reused: int, prompt: int, finish: str | None) -> TurnStats:
        return TurnStats(
            prompt_tokens=prompt, reused_tokens=reused, conversation_tokens=self.cache.offset,
            generated_tokens=r.generation_tokens, generation_tps=r.generation_tps, ttft=r.ttft,
            peak_memory=r.peak_memory, kv_bytes=r.kv_cache_bytes, kv_capacity=self.cache.capacity,
            kv_tokens=r.kv_cache_tokens, window=self.engine.window, finish_reason=finish, turn=self.turns,
        )

    def free(self) -> None:
        """Drop the cache (its memory goes back) and forget what it held."""
        self.cache: RollingKVCache | None = None
        self.tokens: list[int] = []
        self.template: list[int] = []
        self.marks: list[tuple[int, int]] = [(0, 0)]


class SessionStore:
    """ChatSessions by browser session id. Closing one frees its cache; so does being one
    of the least recently used past `max_caches` (its history lives in the browser, so
    its next turn just rebuilds the cache): memory stays bounded however many tabs or
    API clients come and go without closing."""

    def __init__(self, engine: Engine, max_caches: int = 4):
        self.engine = engine
        self.max_caches = max_caches
        self.sessions: dict[str, ChatSession] = {}  # least recently used first

    def get(self, session_id: str) -> ChatSession:
        session = self.sessions.pop(session_id, None) or ChatSession(self.engine)
        self.sessions[session_id] = session
        idle = list(self.sessions.values())[: -self.max_caches]
        if any(s.cache is not None for s in idle):
            with self.engine.lock:  # not while one of them is generating
                for s in idle:
                    s.free()
        return session

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            with self.engine.lock:
                session.free()


def plain_messages(history: Sequence[dict], system: str = "") -> list[dict]:
    """Gradio chat history (content may be a list of {"type": "text", "text": ...} blocks)
    as {"role", "content": str} messages, with the system prompt first if there is one."""
    out = [{"role": "system", "content": system}] if system.strip() else []
    for m in history:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        if isinstance(content, str) and m.get("role") in ("user", "assistant"):
            out.append({"role": m["role"], "content": content})
    return out


def describe(s: TurnStats) -> str:
    """The stats panel (Markdown)."""
    state = {"stop": "finished", "length": "hit max new tokens", "stopped": "stopped",
             "tool_calls": "asked for a function call", None: "generating"}[s.finish_reason]
    lines = [
        f"| **Answer {s.turn}** | {s.generated_tokens} tokens, {state} |", "|---|---|",
        f"| generation | {s.generation_tps:.1f} tok/s |",
        f"| time to first token | {s.ttft * 1000:.0f} ms |",
        f"| prompt | {s.prompt_tokens} tokens prefilled, {s.reused_tokens} reused from the cache |",
        f"| KV cache | {s.kv_tokens} / {s.kv_capacity} tokens, "
        f"{_size(s.kv_used_bytes)} used of {_size(s.kv_bytes)} allocated |",
        f"| peak memory | {_size(s.peak_memory)} |",
        f"| conversation | {s.conversation_tokens} tokens |",
    ]
    if s.rolled:
        what = f"{s.window}-token sliding window" if s.window == s.kv_capacity else \
            f"{s.kv_capacity}-token KV cache (--max-kv-size)"
        lines.append(
            f"\n**Past the {what}:** the model sees the last {s.kv_capacity} tokens; "
            f"the cache rolls in place, so memory stays at {_size(s.kv_bytes)}."
        )
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


__all__ = ["ChatSession", "Engine", "MistralError", "SessionStore", "Settings", "TurnStats",
           "describe", "plain_messages"]
