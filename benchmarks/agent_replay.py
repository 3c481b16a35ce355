"""bench_server.py --agent-replay: a recorded Claude Code session (tests/data/agent_requests) replayed,
turn by turn, against our server with a Tekken v7 and a v13 tokenizer and against mlx_lm.server:
TTFT and cached tokens per turn (see bench_server.py's docstring)."""

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mlx_mistral.serve.build import call_id
from presets import preset_args, write_checkpoint
from servers import CLIENT, ROOT, Server

RECORDED = ROOT / "tests" / "data" / "agent_requests"  # claude_code.json and its .meta.json (the headers)
READ_FILES = ["src/server/routes.py", "src/server/cache.py", "src/cli/main.py", "tests/test_routes.py"]
REMINDER = ("<system-reminder>\nThe task tools haven't been used recently. If you are working on tasks that would "
            "benefit from tracking progress, consider using TaskCreate. Ignore this reminder if not applicable.\n"
            "</system-reminder>")
TEKKEN_VOCAB = 131072
REPLAY_KV = 32768  # our server's --max-kv-size: the ~21k-token conversation and its answers in one row
REPLAY_COLUMNS = [("v7", "ours", "v7"), ("v13", "ours", "v13"), ("mlx_lm", "mlx_lm", "v7")]  # name, server, tokenizer


def read_listing(turn: int) -> str:
    """Turn `turn`'s Read result: a ~200-token Python file numbered as Claude Code's Read tool lists it
    (line number, tab, line), different each turn."""
    stem = Path(READ_FILES[(turn - 2) % len(READ_FILES)]).stem
    lines = [f'"""The {stem} module: helpers for step {turn} of the request pipeline."""', "", "import json",
             "import logging", "from pathlib import Path", "", f"log = logging.getLogger({stem!r})",
             f"LIMIT_{turn} = {turn * 128}", ""]
    verb, doc = (("load", "Read"), ("check", "Validate"), ("store", "Write"))[turn % 3]
    name = f"{stem}_{verb}_{turn}"
    lines += [f"def {name}(path: Path, limit: int = LIMIT_{turn}) -> dict:",
              f'    """{doc} the {stem} record at path (step {turn})."""',
              "    data = json.loads(path.read_text())[:limit]",
              f"    log.info('{name}: %d entries from %s', len(data), path)",
              f"    return {{'name': {name!r}, 'entries': data, 'limit': limit}}", ""]
    return "\n".join(f"{i + 1:6d}\t{line}" for i, line in enumerate(lines))


def replay_session(turns: int, answer_tokens: int, reminder: bool) -> list[dict]:
    """The --agent-replay requests (Anthropic bodies): turn 1 the recorded one, each later turn the
    conversation so far, a fixed assistant turn (text, then a Read tool_use) and the user turn of its
    tool_result (with --reminder, a text block after it); the newest block carries the cache_control."""
    base = json.loads((RECORDED / "claude_code.json").read_text())
    base["max_tokens"] = answer_tokens
    messages, bodies = base.pop("messages"), []
    for turn in range(1, turns + 1):
        if turn > 1:
            path = READ_FILES[(turn - 2) % len(READ_FILES)]
            use_id = f"toolu_01Replay{turn:02d}FixedReadCall{turn:02d}"  # Claude's form: toolu_ and 24 characters
            for message in messages:
                for block in message["content"] if isinstance(message["content"], list) else ():
                    block.pop("cache_control", None)
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": f"I'll read {path} to see how it is built."},
                {"type": "tool_use", "id": use_id, "name": "Read",
                 "input": {"file_path": f"/home/user/project/{path}"}}]})
            content = [{"type": "tool_result", "tool_use_id": use_id, "content": read_listing(turn)}]
            content += [{"type": "text", "text": REMINDER}] if reminder else []
            content[-1]["cache_control"] = {"type": "ephemeral"}
            messages.append({"role": "user", "content": content})
        bodies.append(dict(base, messages=copy.deepcopy(messages)))
    return bodies


def openai_chat(body: dict, model: str) -> dict:
    """`body` (Anthropic's) as an OpenAI chat request, streamed with usage: the system blocks one system
    message, a user turn's tool_results tool messages and its text one user message, an assistant turn
    its text and tool_calls, the tools functions. Text blocks are joined with a blank line, as
    mistral-common joins text chunks, and tool-use ids made Mistral's as our server makes them
    (build.call_id), so that mlx_lm's prompt is the very one our server makes of the same conversation."""
    def text(content: str | list) -> str:
        return content if isinstance(content, str) else "\n\n".join(block["text"] for block in content)

    messages = [{"role": "system", "content": text(body["system"])}]
    for turn in body["messages"]:
        content = turn["content"]
        if isinstance(content, str):
            messages.append({"role": turn["role"], "content": content})
            continue
        texts = [block for block in content if block["type"] == "text"]
        if turn["role"] == "assistant":
            calls = [{"id": call_id(b["id"]), "type": "function",
                      "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                     for b in content if b["type"] == "tool_use"]
            messages.append({"role": "assistant", "content": text(texts) or None}
                            | ({"tool_calls": calls} if calls else {}))
            continue
        messages += [{"role": "tool", "tool_call_id": call_id(b["tool_use_id"]), "content": text(b["content"])}
                     for b in content if b["type"] == "tool_result"]
        messages += [{"role": turn["role"], "content": text(texts)}] if texts else []
    tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                               "parameters": t["input_schema"]}} for t in body.get("tools", [])]
    return {"model": model, "messages": messages, "tools": tools, "max_tokens": body["max_tokens"], "stream": True,
            "stream_options": {"include_usage": True}}


def replay_ours(url: str, body: dict) -> dict:
    """One streamed POST /v1/messages (Claude Code's path and headers): TTFT to message_start (sent with
    the first token), to the first content block, the request's whole time, and message_start's usage."""
    headers = json.loads((RECORDED / "claude_code.meta.json").read_text())["headers"]
    start, out = time.perf_counter(), {}
    with CLIENT.stream("POST", url + "/v1/messages?beta=true", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/messages: {r.status_code} {r.read().decode(errors='replace')[:2000]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["type"] == "message_start":
                usage = event["message"]["usage"]
                out.update(ttft=time.perf_counter() - start, cached=usage["cache_read_input_tokens"],
                           written=usage["cache_creation_input_tokens"],
                           prompt_tokens=usage["input_tokens"] + usage["cache_read_input_tokens"]
                           + usage["cache_creation_input_tokens"])
            elif event["type"] == "content_block_start" and "first_block" not in out:
                out["first_block"] = time.perf_counter() - start
            elif event["type"] == "error":
                raise RuntimeError(f"POST /v1/messages: an error event {event}")
    if "ttft" not in out:
        raise RuntimeError("POST /v1/messages: no message_start in the stream")
    return out | {"total_s": time.perf_counter() - start}


def replay_mlx_lm(url: str, chat: dict) -> dict:
    """One streamed POST /v1/chat/completions: TTFT to the first chunk (mlx_lm sends one once a token
    makes text), the request's whole time, the prompt and cached tokens of its usage (None: not reported)."""
    start, out, usage = time.perf_counter(), {}, {}
    with CLIENT.stream("POST", url + "/v1/chat/completions", json=chat) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/chat/completions: {r.status_code} {r.read().decode(errors='replace')[:2000]}")
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                if chunk.get("choices") and "ttft" not in out:
                    out["ttft"] = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    if "ttft" not in out:
        raise RuntimeError(f"POST /v1/chat/completions: no chunk in the stream (usage {usage})")
    return out | {"total_s": time.perf_counter() - start, "prompt_tokens": usage.get("prompt_tokens"),
                  "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def tekken_checkpoints(preset: str, root: Path) -> dict[str, Path]:
    """`preset`'s random weights with full attention and Tekken's vocabulary under `root`, twice (the same
    files, hard-linked): with a Tekken v7 and a v13 tekken.json (tests/checkpoints.write_tekken)."""
    from tests.checkpoints import write_tekken  # torch and transformers: imported for this workload only

    args = dataclasses.replace(preset_args(preset, sliding_window=None), vocab_size=TEKKEN_VOCAB)
    if args.max_position_embeddings < REPLAY_KV:
        raise SystemExit(f"--preset {preset}: max_position_embeddings {args.max_position_embeddings} < {REPLAY_KV}")
    paths = {"v7": write_checkpoint(args, root / "v7"), "v13": root / "v13"}
    (paths["v7"] / "tokenizer.model").unlink()  # the presets' SentencePiece file: tekken.json is the tokenizer
    paths["v13"].mkdir()
    for file in paths["v7"].iterdir():  # before the tekken.json files, each written fresh
        os.link(file, paths["v13"] / file.name)
    for version, path in paths.items():
        write_tekken(path / "tekken.json", version)
    return paths


def agent_replay(args: argparse.Namespace) -> dict:
    """The --agent-replay workload on each column (REPLAY_COLUMNS), one server at a time; a column whose
    server cannot start or answer is skipped, with the reason (the tail of its output)."""
    bodies = replay_session(args.turns, args.answer_tokens, args.reminder)
    root = Path(tempfile.mkdtemp(prefix=f"mlx-mistral-{args.preset}-tekken-"))
    results: dict = {"servers": {}, "skipped": {}}
    try:
        paths = tekken_checkpoints(args.preset, root)
        for name, kind, version in REPLAY_COLUMNS:
            if kind not in args.servers:
                continue
            model, log = str(paths[version]), root / f"{name}.log"
            extra = ["--max-kv-size", str(REPLAY_KV), "--log-requests"] if kind == "ours" else []
            try:
                server = Server(kind, model, extra, log=log)
            except (RuntimeError, TimeoutError) as e:
                results["skipped"][name] = f"{e}: {log_tail(log)}"
                print(name, "skipped:", results["skipped"][name], file=sys.stderr, flush=True)
                continue
            try:
                if kind == "ours":  # warm-up: a short chat, no prefix in common with the session's
                    replay_ours(server.url, {"model": "tiny", "max_tokens": 4, "stream": True,
                                             "messages": [{"role": "user", "content": "hi"}]})
                else:
                    replay_mlx_lm(server.url, {"model": model, "max_tokens": 4, "stream": True,
                                               "messages": [{"role": "user", "content": "hi"}]})
                rows = []
                for turn, body in enumerate(bodies, 1):
                    rows.append(replay_ours(server.url, body) if kind == "ours"
                                else replay_mlx_lm(server.url, openai_chat(body, model)))
                    print(name, turn, rows[-1], file=sys.stderr, flush=True)
                results["servers"][name] = rows
            except (RuntimeError, httpx.HTTPError) as e:
                if kind == "ours":  # our server's failure is the finding: its output goes with it
                    print(log_tail(log), file=sys.stderr)
                    raise
                results["skipped"][name] = f"{e}: {log_tail(log)}"
                print(name, "skipped:", results["skipped"][name], file=sys.stderr, flush=True)
            finally:
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    v13 = results["servers"].get("v13")
    if v13:
        ratios = [r["ttft"] / v13[0]["ttft"] for r in v13[1:]]
        results["target"] = dict(ratios=ratios, passed=all(x < 0.10 for x in ratios))
    return results


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def print_replay(results: dict, args: argparse.Namespace) -> None:
    servers = results["servers"]
    print(f"{args.preset} float32 (Tekken's vocabulary, full attention), Claude Code 2.1.197's session replayed: "
          f"{args.turns} turns{', with reminders' if args.reminder else ''}, max_tokens {args.answer_tokens} "
          "(the prefill is measured)")
    names = [name for name, _, _ in REPLAY_COLUMNS if name in servers]
    print(f"{'turn':>4} {'prompt v7/v13':>13} "
          + " ".join(f"{name + ' TTFT':>11} {name + ' cached':>13}" for name in names))
    for t in range(args.turns):
        prompt = "/".join(str(servers[n][t]["prompt_tokens"]) for n in ("v7", "v13") if n in servers)
        cells = []
        for name in names:
            r = servers[name][t]
            cells.append(f"{r['ttft']:10.2f}s {'not reported' if r['cached'] is None else r['cached']:>13}")
        print(f"{t + 1:4d} {prompt:>13} " + " ".join(cells))
    if "mlx_lm" in servers and "v7" in servers:
        differ = [t + 1 for t in range(args.turns)
                  if servers["mlx_lm"][t]["prompt_tokens"] != servers["v7"][t]["prompt_tokens"]]
        print("mlx_lm's prompt tokens: " + (f"differ from ours (v7) in turns {differ}: "
                                            + str([servers['mlx_lm'][t - 1]['prompt_tokens'] for t in differ])
                                            if differ else "the same as ours (v7) in every turn"))
    for name, reason in results["skipped"].items():
        print(f"{name}: skipped ({reason})")
    if "target" in results:
        target = results["target"]
        print(f"target: from turn 2, v13 TTFT under 10% of turn 1's: {'PASS' if target['passed'] else 'FAIL'} "
              f"(ratios {', '.join(f'{x:.1%}' for x in target['ratios'])})")
