"""The real agent clients against a live `python -m mlx_mistral.server`: Claude Code 2.1.197 (Anthropic
Messages) and Codex CLI 0.171 (the Responses API), pinned and installed from npm (agent_clients.py),
their traffic only to 127.0.0.1; and both clients' recorded first requests replayed through the
official Python clients' raw HTTP.

The model is a tiny Tekken v13 checkpoint whose weights play a script (scripted_model.py): the next
token depends only on the current one, so after the prompt's last token (ENDS) the answer is fixed. One
model answers every user turn "Hi there."; the other calls Claude Code's Read tool on a file, and
answers "Done." only after `[/TOOL_RESULTS]`: that answer proves the tool_result turn reached the
model, which the server's log shows too.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from agent_clients import BINARIES, REQUIRED, claude_env, codex_env, install
from checkpoints import write_tekken
from mlx_mistral.serve.anthropic_request import Tool, _tool as to_anthropic_tool
from mlx_mistral.serve.responses_request import Offer
from mlx_mistral.structured import Grammars
from mlx_mistral.tokenizer import Tokenizer
from scripted_model import chain, merge, write_scripted
from test_server import free_port

RECORDED = Path(__file__).parent / "data" / "agent_requests"
# a user turn's prompt ends with [/INST]; Claude Code's with [/SYSTEM_PROMPT]: its last message is a system one
ENDS = ("[/INST]", "[/SYSTEM_PROMPT]")
CONTEXT = 65536  # Claude Code's first prompt is ~19k tokens on Tekken, Codex's ~9k


@pytest.fixture(scope="module")
def clients():
    reason = install()
    if reason:
        assert not os.environ.get(REQUIRED), reason
        print(f"skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return BINARIES


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    path = write_tekken(tmp_path_factory.mktemp("tok") / "tekken.json", "v13")
    return path, Tokenizer(path)


class Server:
    """`python -m mlx_mistral.server` on a free port, its log in `log`."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_mistral.server", "--model", str(model), "--port",
                                      str(self.port), "--max-kv-size", str(CONTEXT), "--served-model-name", "tiny", "--log-requests"],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()  # never left running
                raise AssertionError(f"the server did not start: {log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).json()["status"] == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def hi_server(tekken, tmp_path_factory):
    path, tok = tekken
    model = tmp_path_factory.mktemp("hi")
    hi = [*tok.encode("Hi there."), tok.eos_id]
    write_scripted(model, merge(*(chain([tok.control_id(end), *hi]) for end in ENDS)), path, tok.vocab_size)
    server = Server(model, model / "server.log")
    yield server
    server.close()


def run(command: list, env: dict, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_claude_code_says_hi(clients, hi_server, tmp_path):
    done = run([clients["claude"], "-p", "Say hi", "--output-format", "json"],
               claude_env(tmp_path, hi_server.url, "tiny"), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["is_error"], result["result"]) == (False, "Hi there."), result


def test_codex_exec_says_hi(clients, hi_server, tmp_path):
    done = run([clients["codex"], "exec", "--skip-git-repo-check", "Say hi"],
               codex_env(tmp_path, hi_server.url + "/v1", "tiny"), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "Hi there.", done.stdout + done.stderr


def test_claude_code_tool_round_trip(clients, tekken, tmp_path_factory):
    """The model calls Read on notes.txt (Claude Code runs it: a read-only tool, allowed without a prompt
    in -p mode) and, once the tool_result comes back, says "Done."."""
    path, tok = tekken
    work, script = scripted_read(tok)
    model = tmp_path_factory.mktemp("reader")
    write_scripted(model, script, path, tok.vocab_size)
    server = Server(model, model / "server.log")
    try:
        (work / "notes.txt").write_text("The launch code is 7.\n", encoding="utf-8")
        done = run([clients["claude"], "-p", "Read notes.txt", "--output-format", "json"],
                   claude_env(tmp_path_factory.mktemp("home"), server.url, "tiny"), work)
    finally:
        server.close()
        shutil.rmtree(work)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["is_error"], result["result"], result["num_turns"]) == (False, "Done.", 2), result
    turns = [line for line in server.log.read_text().splitlines() if line.startswith("request for 'tiny'")]
    assert len(turns) == 2 and "; 24 tools;" in turns[0] and turns[1].split(";")[0].endswith("assistant, tool"), turns


def scripted_read(tok: Tokenizer) -> tuple[Path, dict]:
    """A new directory under /tmp and the script that calls Read on its notes.txt (V13's
    `[TOOL_CALLS]Read[ARGS]{...}`), then says "Done." after the tool results: the directory's name is
    drawn until the call's tokens repeat no token with another successor."""
    for _ in range(1000):  # about 2.3% of names give a script: 100 draws all failed ~10% of the time
        work = Path(tempfile.mkdtemp(prefix="agent", dir="/tmp"))
        call = [tok.tool_calls_id, *tok.encode("Read"), tok.control_id("[ARGS]"),
                *tok.encode(json.dumps({"file_path": str(work / "notes.txt")})), tok.eos_id]
        try:
            return work, merge(*(chain([tok.control_id(end), *call]) for end in ENDS),
                               chain([tok.control_id("[/TOOL_RESULTS]"), *tok.encode("Done."), tok.eos_id]))
        except ValueError:
            work.rmdir()
    raise AssertionError("no directory name gave a script")


def test_recorded_first_requests_replayed(hi_server):
    """Each client's recorded first request (tests/data/agent_requests, captured from the clients above
    against a recording stub), through the official client's raw HTTP: a 200 and a well-formed stream."""
    body = json.loads((RECORDED / "claude_code.json").read_text(encoding="utf-8"))
    claude = anthropic.Anthropic(base_url=hi_server.url, api_key="any", max_retries=0, timeout=120)
    events = frames(claude.post("/v1/messages?beta=true", body=body, cast_to=str))  # the SDKs raise on an error status
    assert [e["type"] for e in events[:2]] + [e["type"] for e in events[-2:]] == \
        ["message_start", "ping", "message_delta", "message_stop"]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert (text, events[-2]["delta"]["stop_reason"]) == ("Hi there.", "end_turn")
    assert events[0]["message"]["usage"]["input_tokens"] + events[0]["message"]["usage"]["cache_read_input_tokens"] \
        + events[0]["message"]["usage"]["cache_creation_input_tokens"] > 10000

    body = json.loads((RECORDED / "codex.json").read_text(encoding="utf-8"))
    codex = openai.OpenAI(base_url=hi_server.url + "/v1", api_key="any", max_retries=0, timeout=120)
    events = frames(codex.post("/responses", body=body, cast_to=str))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["output"][-1]["content"][0]["text"] == "Hi there."
    assert final["response"]["usage"]["input_tokens"] > 5000  # its developer prompts, tools and context


@pytest.mark.parametrize("version", ["v7", "v13"])
def test_every_recorded_tool_schema_compiles(tmp_path, version):
    """Claude Code's 24 tools and Codex's (its namespace's functions offered by their own names; its
    web_search, a hosted tool, not offered): each tool-call grammar compiles for tool_choice auto and
    required, though their schemas hold keywords the grammar engine lacks (propertyNames): none of
    them is `strict`, so each tool's schema is compiled leniently."""
    tok = Tokenizer(write_tekken(tmp_path / "tekken.json", version))
    claude = json.loads((RECORDED / "claude_code.json").read_text(encoding="utf-8"))
    codex = json.loads((RECORDED / "codex.json").read_text(encoding="utf-8"))
    offers = [[to_anthropic_tool(Tool(**tool), "tools") for tool in claude["tools"]], Offer(codex["tools"]).functions]
    assert [len(tools) for tools in offers] == [24, 12]
    grammars = Grammars(tok, tok.vocab_size)
    for tools in offers:
        for choice in ("auto", "required"):
            assert grammars.for_chat(None, tools, choice) is not None


def frames(text: str) -> list[dict]:
    """The events of a server-sent stream whose frames are `event: TYPE` then `data: {...}` of that type."""
    events = []
    for frame in filter(None, text.split("\n\n")):
        name, data = frame.split("\n", 1)
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}"
    return events
