"""Chat sessions for the app: history -> scheduler requests, streaming, stats, Stop.

Plain Python over the public mlx_mistral API (no Gradio here), so every rule is unit-tested.
"""

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mlx_mistral import MistralError, RollingKVCache
from mlx_mistral.serve import Event, Request, Scheduler

# The one model and the one MLX thread (mlx_mistral/serve/scheduler.py): the app's tabs share it.
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
    """One browser tab: a thin holder of its conversation's place in the scheduler.

    Each answer is a scheduler Request of this session, decoded in the same batch as the
    other tabs' and the API's. The KV cache and the rule that reuses it are the scheduler's
    (PrefixCache.plan): the session's last cache is kept as long as the scheduler's idle LRU
    allows, and a next turn that continues it prefills only the new tokens, with the
    model's own answer tokens in place of the re-encoded ones; an edited, regenerated or
    undone turn, a cleared chat or a changed system prompt gets a fresh cache. Either way
    the model sees the same tokens.
    """

    def __init__(self, engine: Engine, reuse: bool = True):
        self.engine = engine
        self.reuse = reuse
        self.stats: TurnStats | None = None
        self.answer = ""  # the last answer's text, all of it (also after Stop)
        self.turns = 0
        self.answering = threading.Lock()  # held while an answer streams
        self.request: Request | None = None
        self.closed = False

    @property
    def cache(self) -> RollingKVCache | None:
        """The session's idle KV cache in the scheduler (None while answering, or once dropped)."""
        held = self.engine.held(self)
        return held.cache if held else None

    @property
    def tokens(self) -> list[int]:
        """The conversation as the model saw it, its last answer token included (the cache
        holds all but that one)."""
        held = self.engine.held(self)
        return held.actual if held else []

    def _request(self, messages: Sequence[dict], settings: Settings | None = None) -> Request:
        settings = settings or Settings()
        tokenizer = self.engine.tokenizer
        return Request(tokenizer.chat_tokens(messages), int(settings.max_tokens), settings.temperature,
                       settings.top_p, settings.seed, echo=tokenizer.encode, session=self, reuse=self.reuse,
                       repetition_penalty=settings.repetition_penalty, roll=True)

    def plan(self, messages: Sequence[dict]) -> tuple[list[int], bool]:
        """(the tokens to feed, whether they continue the cache) for `messages`."""
        ids, held = self.engine.plan(self._request(messages))
        return ids[held:], held > 0

    def respond(self, messages: Sequence[dict], settings: Settings) -> Iterator[tuple[str, str, TurnStats]]:
        """Stream the answer to `messages` (the last one from the user): (reasoning so far, text
        so far, stats); the reasoning is a reasoning model's [THINK] part (TextStream's split).

        Closing the iterator (the Stop button) cancels the request: its row leaves the batch
        before the next step, and the scheduler keeps its cache with every token generated
        until then, which `answer` holds as text. Sent back as the assistant's turn, that
        partial answer continues the cache; anything else (such as a browser that missed the
        last tokens) rebuilds it.
        """
        with self.answering:
            request = self.engine.submit(self._request(messages, settings))
            self.request, self.turns, reasoning, text, last = request, self.turns + 1, "", "", None
            events = request.events()
            try:
                for event in events:
                    reasoning, text = reasoning + event.reasoning, text + event.text
                    if event.token is not None:
                        last = event
                        yield reasoning, text, self._stats(event, None)
            finally:
                request.cancel()  # a no-op once finished
                for event in events:  # to the last one: the scheduler then holds the cache
                    text += event.text
                    last = event if event.token is not None else last
                self.request, self.answer = None, text
                if self.closed:
                    self.engine.forget(self)
                if last is not None:
                    self.stats = self._stats(last, "stopped" if event.finish_reason == "cancelled"
                                             else event.finish_reason)
            if event.finish_reason == "error":
                raise MistralError(f"generation failed: {event.error}")

    def _stats(self, e: Event, finish: str | None) -> TurnStats:
        return TurnStats(
            prompt_tokens=e.prefilled_tokens, reused_tokens=e.reused_tokens,
            conversation_tokens=e.reused_tokens + e.prefilled_tokens + e.generated_tokens,
            generated_tokens=e.generated_tokens, generation_tps=e.generation_tps, ttft=e.ttft,
            peak_memory=e.peak_memory, kv_bytes=self.engine.row_bytes, kv_capacity=self.engine.capacity,
            kv_tokens=e.kv_tokens, window=self.engine.window, finish_reason=finish, turn=self.turns,
        )

    def close(self) -> None:
        """The tab is gone: stop its answer and drop its cache."""
        self.closed = True
        if self.request is not None:
            self.request.cancel()
        self.engine.forget(self)


class SessionStore:
    """ChatSessions by browser session id. Closing one stops its answer and frees its cache.
    The scheduler keeps at most `max_idle` idle caches (4 by default), least recently used
    out first, one per session: however many tabs or API clients come and go without
    closing, memory stays bounded, and a tab whose cache went rebuilds it from its history
    (kept in the browser) on its next turn."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions: dict[str, ChatSession] = {}

    def get(self, session_id: str) -> ChatSession:
        if session_id not in self.sessions:
            self.sessions[session_id] = ChatSession(self.engine)
        return self.sessions[session_id]

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.close()


def plain_messages(history: Sequence[dict], system: str = "") -> list[dict]:
    """Gradio chat history (content may be a list of {"type": "text", "text": ...} blocks)
    as {"role", "content": str} messages, with the system prompt first if there is one. Thought
    messages (a reasoning block: metadata with a title) are left out, as OpenAI clients leave
    out reasoning_content."""
    out = [{"role": "system", "content": system}] if system.strip() else []
    for m in history:
        if (m.get("metadata") or {}).get("title"):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        if isinstance(content, str) and m.get("role") in ("user", "assistant"):
            out.append({"role": m["role"], "content": content})
    return out


def reply(reasoning: str, text: str, done: bool = False) -> str | list[dict]:
    """The chat's answer: its text, below a "Reasoning" thought block when the model reasoned,
    open while the reasoning streams and collapsed once the answer begins (or it is `done`)."""
    if not reasoning:
        return text
    status = "done" if text or done else "pending"
    return [{"role": "assistant", "content": reasoning, "metadata": {"title": "Reasoning", "status": status}},
            {"role": "assistant", "content": text}]


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
           "describe", "plain_messages", "reply"]
