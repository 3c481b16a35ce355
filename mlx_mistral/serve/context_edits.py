"""Anthropic's context_management.edits, applied to a request's chat messages before its prompt is made.

- `clear_thinking_*` (Claude Code sends it with any `keep`): nothing to do, since earlier turns'
  thinking never reaches the prompt here (anthropic_request leaves it out).
- `clear_tool_uses_*`: once the prompt passes `trigger` (input tokens, default 100,000), the results
  of every tool use but the `keep` latest (tool uses, default 3) are replaced by a placeholder,
  except those of `exclude_tools`; with `clear_tool_inputs` the calls' inputs too. Nothing is
  cleared unless that frees at least `clear_at_least` tokens (default 0): clearing changes an early
  part of the prompt, so the prefix cache misses from there once. The response's
  `context_management.applied_edits` says what was cleared.
Any other edit type is refused by name.
"""

from collections.abc import Callable

from .http import APIError

CLEARED = "[tool result cleared]"
TRIGGER, KEEP = 100_000, 3  # Anthropic's defaults: input tokens, tool uses


def check(management: object) -> list[dict]:
    """The edits of `management` (a 400 naming the first that is not one of the above)."""
    if management in (None, {}):
        return []
    edits = management.get("edits") if isinstance(management, dict) else None
    if not isinstance(edits, list):
        raise APIError(400, "context_management.edits: expected a list of edits", param="context_management.edits")
    for i, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not isinstance(kind, str) or not kind.startswith(("clear_thinking_", "clear_tool_uses_")):
            raise APIError(400, f"context_management.edits.{i}.type: {kind!r} is not supported (only "
                           "clear_thinking_* and clear_tool_uses_*)", param=f"context_management.edits.{i}.type")
        for field in ("trigger", "keep", "clear_at_least") if kind.startswith("clear_tool_uses_") else ():
            _value(edit, field, f"context_management.edits.{i}", 0)
    return edits


def apply(edits: list[dict], messages: list[dict], count: Callable[[list[dict]], int]) -> tuple[list[dict], list[dict]]:
    """(the messages with the tool-use edits applied, the applied_edits to report); `count` gives a
    list of messages' prompt tokens."""
    applied = []
    for i, edit in enumerate(edits):
        if not edit["type"].startswith("clear_tool_uses_"):
            continue
        where = f"context_management.edits.{i}"
        before = count(messages)
        if before <= _value(edit, "trigger", where, TRIGGER):
            continue
        cleared, uses = _clear(messages, _value(edit, "keep", where, KEEP), set(edit.get("exclude_tools") or ()),
                               bool(edit.get("clear_tool_inputs")))
        freed = before - count(cleared) if uses else 0
        if uses and freed >= _value(edit, "clear_at_least", where, 0):
            messages = cleared
            applied.append({"type": edit["type"], "cleared_tool_uses": uses, "cleared_input_tokens": freed})
    return messages, applied


def _clear(messages: list[dict], keep: int, exclude: set[str], inputs: bool) -> tuple[list[dict], int]:
    """The messages with all but the `keep` latest tool results cleared (and their calls' inputs, with
    `inputs`), and how many tool uses that cleared."""
    names = {call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls", ())}
    results = [i for i, m in enumerate(messages) if m["role"] == "tool" and names.get(m["tool_call_id"]) not in exclude]
    old = results[:max(len(results) - keep, 0)]
    ids = {messages[i]["tool_call_id"] for i in old}
    out = [dict(m, content=CLEARED) if i in old else m for i, m in enumerate(messages)]
    if inputs:
        out = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments="{}")) if c["id"] in ids else c
                                   for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in out]
    return out, len(old)


def _value(edit: dict, field: str, where: str, default: int) -> int:
    """An edit's {"type": ..., "value": N} field (trigger, keep, clear_at_least), or `default`."""
    given = edit.get(field)
    if given is None:
        return default
    value = given.get("value") if isinstance(given, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise APIError(400, f"{where}.{field}: expected {{\"type\": ..., \"value\": N}} with N >= 0",
                       param=f"{where}.{field}")
    return value
