"""The OpenAI-compatible server, live on 127.0.0.1: the official client, batching, errors, overload."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from mlx_mistral.demo import TOKENIZER_V1
from mlx_mistral.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
KV_ROW_BYTES = 2 * 4 * 2 * 64 * 32 * 4  # demo: K and V, 4 layers, 2 KV heads, 64 slots, head_dim 32, float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mlx_mistral.server` in a subprocess on a free loopback port; always stopped."""

    def __init__(self, *args: str, module: str = "mlx_mistral.server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--model", "demo",
                                      "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:  # 503 while loading
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise TimeoutError("the server did not start")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=auth(), timeout=10).text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health", timeout=10).json() == {"status": "ok"}


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def servers():
    """Both servers start at once (their startups overlap): the main one and a small-queue one."""
    main = Server("--max-batch", "16", "--api-key", KEY)
    small = Server("--max-batch", "2", "--max-queue", "4")
    try:
        yield main.wait(), small.wait()
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER_V1)


def chat(client, content, stream=False, **kw):
    kw = {"model": "demo", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
    return client.chat.completions.create(stream=stream, **kw)


def streamed(client, content, **kw):
    pieces, finish, usage = [], None, None
    for chunk in chat(client, content, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(pieces), finish, usage


def test_chat_streamed_equals_whole_with_real_usage(client, tok):
    whole = chat(client, "Tell me about grouped-query attention.", max_tokens=12)
    text, finish, usage = streamed(client, "Tell me about grouped-query attention.", max_tokens=12)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content and text
    assert finish == whole.choices[0].finish_reason == "length"
    prompt = len(tok.chat_tokens([{"role": "user", "content": "Tell me about grouped-query attention."}]))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt, 12, prompt + 12)
    assert usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.prompt_tokens_details.cached_tokens == 0  # a prompt never sent before


def test_stop_strings_completions_and_models(client, tok):
    assert [m.id for m in client.models.list().data] == ["demo"]
    full = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tok.encode("Once upon a time", bos=True))
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=10, temperature=0,
                                    stop=[stop, "never appears"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    seeded = [chat(client, "hi", max_tokens=6, temperature=0.9, seed=5).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_next_chat_turn_reuses_the_held_cache(server, client, tok):
    first = [{"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(model="demo", messages=first, max_tokens=8, temperature=0)
    before = server.metrics()["mlx_mistral_reused_tokens_total"]
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "Another one."}]
    again = client.chat.completions.create(model="demo", messages=second, max_tokens=4, temperature=0)
    assert again.choices[0].finish_reason == "length"
    reused = server.metrics()["mlx_mistral_reused_tokens_total"] - before
    assert reused == len(tok.chat_tokens(first)) + 7  # the prompt and the answer but its last token


def test_a_shared_prefix_is_reported_as_cached_tokens(server, client, tok):
    """Two prompts that share their first 591 tokens: the second's usage says 512 were cached
    (four whole blocks), /metrics counts the hit and the blocks in memory."""
    prefix = " ".join(f"rule {i}: always answer in kind." for i in range(60))
    before = server.metrics()
    texts = [prefix + " First question?", prefix + " A second, different question?"]
    answers = [client.completions.create(model="demo", prompt=t, max_tokens=4, temperature=0) for t in texts]
    assert len(tok.encode(prefix, bos=True)) == 591
    assert [a.usage.prompt_tokens_details.cached_tokens for a in answers] == [0, 512]
    m = server.metrics()
    assert m['mlx_mistral_prefix_cache_blocks{tier="memory"}'] >= 2
    assert m['mlx_mistral_prefix_cache_bytes{tier="memory"}'] > 0
    assert m['mlx_mistral_prefix_cache_bytes{tier="disk"}'] == m['mlx_mistral_prefix_cache_blocks{tier="disk"}'] == 0
    assert 0 < m['mlx_mistral_prefix_cache_hit_rate{of="requests"}'] < 1
    assert 0 < m['mlx_mistral_prefix_cache_hit_rate{of="tokens"}'] < 1
    assert m["mlx_mistral_reused_tokens_total"] - before["mlx_mistral_reused_tokens_total"] == 512


def test_sixteen_concurrent_streams_equal_solo_runs_in_one_batch(server, client):
    prompts = [("word " * (1 + 7 * i)).strip() for i in range(16)]
    solo = [chat(client, p, max_tokens=24).choices[0].message.content for p in prompts]
    before = server.metrics()
    got: dict[int, str] = {}

    def run(i):
        got[i] = streamed(client, prompts[i], max_tokens=24)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(16)] == solo
    after = server.metrics()
    assert after["mlx_mistral_decode_rows_max"] >= 8
    assert after["mlx_mistral_running_rows"] == 0
    assert after["mlx_mistral_generated_tokens_total"] - before["mlx_mistral_generated_tokens_total"] == 16 * 24


def test_disconnect_mid_stream_frees_its_row(server, client):
    before = server.metrics()['mlx_mistral_finished_requests_total{reason="cancelled"}']
    others = [threading.Thread(target=lambda: chat(client, "stay", max_tokens=40)) for _ in range(2)]
    for t in others:
        t.start()
    body = {"model": "demo", "messages": [{"role": "user", "content": "leave"}], "max_tokens": 2000,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(8), lines) if line.startswith("data:")) >= 3
    for t in others:
        t.join(60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        if m['mlx_mistral_finished_requests_total{reason="cancelled"}'] > before and not m["mlx_mistral_running_rows"]:
            break
        time.sleep(0.1)
    assert m['mlx_mistral_finished_requests_total{reason="cancelled"}'] == before + 1
    assert (m["mlx_mistral_running_rows"], m["mlx_mistral_prefilling_rows"], m["mlx_mistral_queue_depth"]) == (0, 0, 0)
    assert m["mlx_mistral_generated_tokens_total"] < 2000  # it stopped generating
    # only idle caches and blocks held
    assert m["mlx_mistral_kv_bytes"] == m["mlx_mistral_idle_caches"] * KV_ROW_BYTES + \
        m['mlx_mistral_prefix_cache_bytes{tier="memory"}']


def test_disconnect_while_waiting_for_a_whole_answer_frees_its_row(server):
    """A non-streamed request whose client gives up: the server notices within its poll and the
    row leaves the batch long before max_tokens."""
    before = server.metrics()
    body = {"model": "demo", "messages": [{"role": "user", "content": "leave"}], "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        if m['mlx_mistral_finished_requests_total{reason="cancelled"}'] > \
                before['mlx_mistral_finished_requests_total{reason="cancelled"}'] and not m["mlx_mistral_running_rows"]:
            break
        time.sleep(0.1)
    assert m['mlx_mistral_finished_requests_total{reason="cancelled"}'] == \
        before['mlx_mistral_finished_requests_total{reason="cancelled"}'] + 1
    assert m["mlx_mistral_running_rows"] == 0
    assert m["mlx_mistral_generated_tokens_total"] - before["mlx_mistral_generated_tokens_total"] < 2000
    assert server.healthy()


GOOD = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ASK = {"model": "demo", "input": "hi", "max_output_tokens": 2}
BAD = [  # (method, path, body or raw bytes, headers, status, param in the message)
    ("POST", "/v1/chat/completions", b'{"model": "demo",', None, 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", GOOD | {"max_tokens": "ten"}, None, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", GOOD | {"max_tokens": 0}, None, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", GOOD | {"max_tokens": -3}, None, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", GOOD | {"temperature": -0.5}, None, 400, "temperature"),
    ("POST", "/v1/chat/completions", GOOD | {"top_p": 0}, None, 400, "top_p"),
    ("POST", "/v1/chat/completions", GOOD | {"n": 2}, None, 400, "n"),
    ("POST", "/v1/chat/completions", GOOD | {"logit_bias": {"1": 5}}, None, 400, "logit_bias"),
    ("POST", "/v1/chat/completions", GOOD | {"messages": []}, None, 400, "messages"),
    ("POST", "/v1/chat/completions", GOOD | {"messages": [{"role": "robot", "content": "x"}]}, None, 400, "role"),
    ("POST", "/v1/chat/completions", GOOD | {"messages": [{"role": "assistant", "content": "x"}]}, None, 400,
     "must end with a user message"),
    ("POST", "/v1/chat/completions", GOOD | {"max_tokens": 40000}, None, 400, "past the context"),
    ("POST", "/v1/chat/completions", GOOD, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("POST", "/v1/chat/completions", GOOD, {"Authorization": ""}, 401, "API key"),
    ("POST", "/v1/chat/completions", GOOD | {"stop": [""]}, None, 400, "stop"),
    ("POST", "/v1/completions", {"model": "demo", "prompt": ""}, None, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "demo", "prompt": "x" * (2 << 20)}, None, 413, "larger than"),
    ("POST", "/v1/completions", iter([b"{" + b" " * (1 << 20), b"}"]), None, 413, "larger than"),  # chunked
    ("GET", "/v1/nothing", None, None, 404, "unknown route"),
    ("POST", "/v1/completions", {"model": "demo", "prompt": "a\ud800b"}, None, 400, "prompt"),
    ("POST", "/v1/chat/completions", GOOD | {"messages": [{"role": "user", "content": "\udfff"}]}, None, 400,
     "not valid Unicode"),
    # the Responses API
    ("POST", "/v1/responses", {"model": "demo"}, None, 400, "input"),
    ("POST", "/v1/responses", ASK | {"input": []}, None, 400, "input"),
    ("POST", "/v1/responses", ASK | {"input": [{"type": "item_reference", "id": "x"}]}, None, 400, "input.0.type"),
    ("POST", "/v1/responses", ASK | {"input": [{"role": "tool", "content": "x"}]}, None, 400, "input.0.role"),
    ("POST", "/v1/responses", ASK | {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]}, None, 400, "text-only model"),
    ("POST", "/v1/responses", ASK | {"previous_response_id": "resp_nope"}, None, 400, "previous_response_id"),
    ("POST", "/v1/responses", ASK | {"tool_choice": {"type": "web_search"}}, None, 400, "tool_choice.type"),
    ("POST", "/v1/responses", ASK | {"tools": [{"type": "function", "name": "f"}], "tool_choice": {
        "type": "function", "name": "g"}}, None, 400, "tool_choice.name"),
    ("POST", "/v1/responses", ASK | {"tools": [{"type": "function", "parameters": {}}]}, None, 400, "tools.0.name"),
    ("POST", "/v1/responses", ASK | {"text": {"format": {"type": "xml"}}}, None, 400, "text.format.type"),
    ("POST", "/v1/responses", ASK | {"background": True}, None, 400, "background"),
    ("POST", "/v1/responses", ASK | {"max_output_tokens": 0}, None, 400, "max_output_tokens"),
    ("POST", "/v1/responses", ASK | {"input": "word " * 40000}, None, 400, "past the context"),
    ("GET", "/v1/responses/resp_nope", None, None, 404, "not found"),
    ("DELETE", "/v1/responses/resp_nope", None, None, 404, "not found"),
]


@pytest.mark.parametrize("method, path, body, headers, status, says", BAD, ids=[b[5] + str(i) for i, b in enumerate(BAD)])
def test_bad_request_gets_an_openai_error(server, method, path, body, headers, status, says):
    content = body if isinstance(body, bytes) or hasattr(body, "__next__") else \
        json.dumps(body).encode() if body is not None else None
    h = auth() | {"content-type": "application/json"} | (headers or {})
    r = httpx.request(method, server.url + path, content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"]
    assert server.healthy()


def test_overload_gets_429_with_retry_after_and_the_rest_complete(servers):
    small = servers[1]
    results = []

    def run():
        r = httpx.post(small.url + "/v1/completions", timeout=120,
                       json={"model": "demo", "prompt": "load", "max_tokens": 16, "temperature": 0})
        results.append(r)

    threads = [threading.Thread(target=run) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 20 and set(statuses) == {200, 429}
    for r in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    assert small.healthy()


def test_soak_nothing_lost_memory_flat(server, client):
    def rss() -> int:
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    done = []

    def run(n):
        for i in range(n):
            r = chat(client, f"question {i % 7}", max_tokens=3)
            done.append(r.usage.completion_tokens)

    def batch(n_threads, per_thread):
        threads = [threading.Thread(target=run, args=(per_thread,)) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    start = time.monotonic()
    batch(6, 10)  # warm-up: 60 requests
    warm = rss()
    batch(6, 40)  # 240 more
    assert len(done) == 300 and set(done) == {3}
    assert rss() <= warm * 1.05
    assert time.monotonic() - start < 120
    assert server.healthy()


def test_503_while_the_model_loads():
    from concurrent.futures import Future

    from fastapi.testclient import TestClient

    from mlx_mistral.serve import create_app

    client = TestClient(create_app(Future(), name="demo"))  # in-process: no socket
    assert client.get("/health").status_code == 503
    r = client.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5" and r.json()["error"]["code"] == "loading"


def test_a_missing_model_exits_2():
    run = subprocess.run([sys.executable, "-m", "mlx_mistral.server", "--model", "/no/such/model", "--port",
                          str(free_port())], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.splitlines()[-1].startswith("error: ")


def test_bad_kv_bits_refused_before_the_model_loads():
    """--kv-bits 3 is refused before a model is read: the model path does not even exist."""
    run = subprocess.run([sys.executable, "-m", "mlx_mistral.server", "--model", "/no/such/model", "--kv-bits", "3",
                          "--port", str(free_port())], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == \
        "error: kv_bits must be 4 or 8 (or None for a float cache), got 3"


@pytest.mark.parametrize("flags, says", [
    (["--prompt-cache-gb", "-1"], "error: --prompt-cache-gb must be a positive number of GB, got -1"),
    (["--prompt-cache-mib", "-2"], "error: --prompt-cache-mib must be an integer >= 0, got -2"),
    (["--prompt-cache-dir", "README.md"], "error: prompt cache directory 'README.md': expected a directory, "
                                          "found a file"),
])
def test_bad_prompt_cache_flags_refused_before_the_model_loads(flags, says):
    run = subprocess.run([sys.executable, "-m", "mlx_mistral.server", "--model", "/no/such/model", *flags,
                          "--port", str(free_port())], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == says


def test_a_restarted_server_answers_a_repeated_prefix_from_its_prompt_cache_dir(tmp_path):
    """Stopped with Ctrl-C, the server has written its blocks; started again on the same
    directory, it reuses them: cached tokens, the same greedy answer."""
    prompt = " ".join(f"rule {i}: always answer in kind." for i in range(60)) + " Go on?"
    answers = []
    for _ in range(2):
        server = Server("--prompt-cache-dir", str(tmp_path), "--api-key", KEY).wait()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            answers.append(client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0))
        finally:
            assert server.stop() == 130
    assert [a.usage.prompt_tokens_details.cached_tokens for a in answers] == [0, 512]
    assert answers[0].choices[0].text == answers[1].choices[0].text


@pytest.mark.parametrize("command", [["mlx_mistral.server"], ["app", "--api"]])
def test_a_port_in_use_is_refused_before_the_model_loads(command):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", *command, "--model", "/no/such/model", "--port", str(port)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                             timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port} (")


def test_non_loopback_host_needs_a_key():
    run = subprocess.run([sys.executable, "-m", "mlx_mistral.server", "--host", "0.0.0.0"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error: --host 0.0.0.0") and "--api-key" in run.stderr


def test_ctrl_c_exits_130(servers):
    small = servers[1]
    assert small.stop() == 130
    assert "[server stopped]" in small.proc.stderr.read()


API_TOKENS = 400  # long enough for the tab's answer to start while it streams


def test_app_with_api_serves_the_page_and_v1_from_one_model():
    """python -m app --api: a chat tab (through gradio_client) and an API stream answer at once,
    decoded in the same batch by the one scheduler, each as it answers alone."""
    from gradio_client import Client

    app = Server("--api", module="app")
    try:
        app.wait()
        assert "gradio" in httpx.get(app.url + "/", timeout=30).text.lower()
        api = openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        first, pieces, usage = threading.Event(), [], []

        def stream_api():
            for chunk in chat(api, "hello", stream=True, max_tokens=API_TOKENS,
                              stream_options={"include_usage": True}):
                pieces.extend(c.delta.content or "" for c in chunk.choices)
                usage.append(chunk.usage)
                first.set()

        tab = Client(app.url + "/", verbose=False)
        stream = threading.Thread(target=stream_api)
        stream.start()
        assert first.wait(60)
        text, panel = tab.predict("hi", system="", temperature=0.0, top_p=1.0, max_tokens=16, repetition_penalty=1.0,
                                  seed=0, api_name="/chat")
        stream.join(120)
        tab.close()
        assert not stream.is_alive() and "16 tokens" in panel
        metrics = app.metrics()
        assert metrics["mlx_mistral_decode_rows_max"] >= 2  # the tab's row and the API's in one step
        assert metrics["mlx_mistral_generated_tokens_total"] == 16 + usage[-1].completion_tokens  # one model
        # each answer is what it is alone (greedy): the same requests again, one at a time
        assert text == chat(api, "hi", max_tokens=16).choices[0].message.content
        assert "".join(pieces) == chat(api, "hello", max_tokens=API_TOKENS).choices[0].message.content
    finally:
        assert app.stop() == 130
