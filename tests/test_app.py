"""The app's session logic on the `demo` model (window 64): prompts, cache reuse, Stop, regenerate."""

import gc
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from app.chat import ChatSession, Engine, SessionStore, Settings, TurnStats, describe, plain_messages, reply
from checkpoints import tiny_config, write_hf
from mlx_mistral import MistralError, make_sampler, stream_generate

GREEDY = Settings(temperature=0.0, max_tokens=12)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    engine = Engine("demo")
    yield engine
    engine.close()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def answer(session, messages, settings=GREEDY):
    """Run one turn to the end: (text, the tokens it generated)."""
    text = ""
    for _, text, _ in session.respond(messages, settings):
        pass
    return text, session.tokens[len(session.tokens) - session.stats.generated_tokens:]


def reference(engine, tokens, max_tokens):
    """What the public API generates greedily from `tokens` in one go, without the app."""
    stream = stream_generate(engine.model, engine.tokenizer, tokens, max_tokens=max_tokens,
                             sampler=make_sampler(0.0))
    return engine.call(lambda: [r.token for r in stream])


def check_consistent(session):
    """The scheduler holds the session's cache: the conversation but the model's last token
    (not fed yet); no row is left in the batch."""
    assert session.cache.offset == len(session.tokens) - 1
    assert session.engine.held(session).fed == session.tokens[:-1]
    idle(session.engine)


def idle(engine):
    stats = engine.stats()
    assert (stats["running"], stats["prefilling"], stats["waiting"]) == (0, 0, 0)


def test_plain_messages_reads_gradio_content_blocks():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello", "metadata": None},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
    ]
    assert plain_messages(history, "be brief") == [
        {"role": "system", "content": "be brief"}, user("hi"), assistant("hello"), user("two parts"),
    ]
    assert plain_messages(history[:1], "  ") == [user("hi")]


def test_reasoning_shows_in_a_collapsed_block_above_the_answer(reasoning_checkpoint, monkeypatch):
    """A reasoning model's [THINK] part streams into a "Reasoning" thought (open while it streams,
    collapsed once the answer begins), Gradio's Chatbot takes it, and the next turn leaves it out."""
    import gradio as gr

    import mlx_mistral.serve.batch as batch
    from mlx_mistral.tokenizer import Tokenizer
    from test_server_tools import Script

    tok = Tokenizer(reasoning_checkpoint / "tekken.json")
    script = Script(tok.eos_id)
    monkeypatch.setattr(batch, "make_picker", script.picker)
    begin, end = tok.think_ids
    script.ids = [begin, *tok.encode("Two plus two."), end, *tok.encode("It is 4."), tok.eos_id]
    engine = Engine(str(reasoning_checkpoint))
    try:
        session = ChatSession(engine)
        history = [user("2 + 2?")]
        shown = [reply(r, t) for r, t, _ in session.respond(history, Settings(temperature=1.0, max_tokens=50))]
        thought = {"title": "Reasoning", "status": "pending"}
        assert shown[1] == [{"role": "assistant", "content": "Two", "metadata": thought}, assistant("")]
        final = shown[-1]
        assert final[0]["content"] == "Two plus two." and final[0]["metadata"]["status"] == "done"
        assert final[1] == assistant("It is 4.")
        assert reply("Two plus two.", "", done=True)[0]["metadata"]["status"] == "done"  # ended in reasoning
        assert reply("", "no reasoning") == "no reasoning"
        shown_history = gr.Chatbot().postprocess(history + final).model_dump()
        assert shown_history[1]["metadata"]["title"] == "Reasoning" and shown_history[2]["content"][0]["text"] == \
            "It is 4."
        nxt = history + final + [user("And 3 + 3?")]
        assert plain_messages(nxt) == [user("2 + 2?"), assistant("It is 4."), user("And 3 + 3?")]
        assert session.plan(plain_messages(nxt))[1]  # the next turn continues the cache
    finally:
        engine.close()


def test_first_turn_feeds_the_whole_prompt_and_matches_the_api(engine):
    session = ChatSession(engine)
    messages = [user("Hello there")]
    prompt = engine.tokenizer.chat_tokens(messages)
    assert session.plan(messages) == (prompt, False)
    text, generated = answer(session, messages)
    assert generated == reference(engine, prompt, GREEDY.max_tokens)
    assert text == engine.tokenizer.decode(generated)
    assert session.tokens == prompt + generated
    assert session.stats.prompt_tokens == len(prompt) and session.stats.reused_tokens == 0
    check_consistent(session)


def test_next_turn_prefills_only_the_new_tokens(engine):
    session = ChatSession(engine)
    history = [user("Hello there")]
    text, _ = answer(session, history)
    held = list(session.tokens)
    history += [assistant(text), user("And then?")]
    feed, reused = session.plan(history)
    assert reused
    prompt = engine.tokenizer.chat_tokens(history)
    # the answer's last token (generated, not yet fed), then the new turn's tokens
    assert feed[0] == held[-1] and prompt[-(len(feed) - 1):] == feed[1:] and len(feed) < len(prompt) // 2
    assert feed[1] == engine.tokenizer.eos_id  # the first answer stopped at max_tokens, not at EOS
    _, generated = answer(session, history)
    assert session.stats.reused_tokens == len(held) - 1 and session.stats.prompt_tokens == len(feed)
    assert session.tokens == held + feed[1:] + generated
    # Reuse changes the cost, not the answer: one prefill of the same tokens gives the same ids.
    assert generated == reference(engine, held + feed[1:], GREEDY.max_tokens)
    check_consistent(session)


def test_reuse_holds_the_models_own_tokens_even_when_reencoding_differs(engine):
    session = ChatSession(engine)
    history = [user("hi")]
    text, generated = answer(session, history)
    assert engine.tokenizer.encode(text) != generated  # demo's gibberish re-encodes differently
    assert session.plan(history + [assistant(text), user("more")])[1]


def test_long_chat_rolls_past_the_window_in_flat_memory(engine):
    session = ChatSession(engine)
    history, kv_bytes, peaks = [], set(), []
    for turn in range(6):
        history.append(user(f"turn {turn}: tell me more"))
        held = len(session.tokens)
        text, _ = answer(session, history)
        history.append(assistant(text))
        kv_bytes.update({session.stats.kv_bytes, session.cache.nbytes})
        peaks.append(session.stats.peak_memory)
        assert session.stats.reused_tokens == max(held - 1, 0)  # 0 on the first turn
    assert session.cache.offset > 2 * engine.window and session.stats.rolled
    assert session.stats.kv_tokens == session.stats.kv_capacity == engine.window
    assert len(kv_bytes) == 1 and max(peaks) < 1.1 * min(peaks)
    assert f"Past the {engine.window}-token sliding window" in describe(session.stats)
    check_consistent(session)


@pytest.mark.parametrize("change", ["regenerate", "edit", "undo", "system prompt", "clear"])
def test_a_changed_history_rebuilds_the_cache(engine, change):
    session = ChatSession(engine)
    history = [user("first question")]
    text, _ = answer(session, history)
    first_turn = list(session.tokens)
    history += [assistant(text), user("second question")]
    answer(session, history)
    old_cache = weakref.ref(session.cache)
    changed = {
        "regenerate": history,  # the same prompt again: the cache already holds an answer to it
        "edit": history[:2] + [user("second question, edited")],
        "undo": history[:1],
        "system prompt": [{"role": "system", "content": "Be brief."}] + history,
        "clear": [user("a new chat")],
    }[change]
    feed, reused = session.plan(changed)
    assert not reused
    prompt = engine.tokenizer.chat_tokens(changed)
    if change in ("regenerate", "edit"):  # the first answer is still the model's own tokens
        assert feed == first_turn + prompt[len(engine.tokenizer.chat_tokens(history[:1])) + len(
            engine.tokenizer.encode(text)):]
    else:
        assert feed == prompt
    _, generated = answer(session, changed)
    assert session.stats.reused_tokens == 0 and session.stats.prompt_tokens == len(feed)
    assert session.tokens == feed + generated
    gc.collect()
    assert old_cache() is None  # the old cache was freed, not kept beside the new one
    check_consistent(session)


def test_regenerate_with_greedy_sampling_gives_the_same_answer(engine):
    session = ChatSession(engine)
    history = [user("Say something")]
    text, first = answer(session, history)
    assert answer(session, history) == (text, first)
    history += [assistant(text), user("Say more")]
    second = answer(session, history)  # reuses the cache
    assert session.stats.reused_tokens
    assert answer(session, history) == second  # a fresh cache, the same tokens, the same answer
    assert session.stats.reused_tokens == 0


def test_a_system_prompt_is_kept_across_reused_turns(engine):
    session = ChatSession(engine)
    history = [{"role": "system", "content": "You are terse."}, user("hi")]
    text, _ = answer(session, history)
    history += [assistant(text), user("again")]
    assert session.plan(history)[1]  # V1 puts it in the first user message: the prefix is unchanged
    answer(session, history)
    first_prompt = engine.tokenizer.chat_tokens(history[:2])
    assert session.tokens[: len(first_prompt)] == first_prompt


def test_stop_keeps_the_partial_answer_and_the_cache_consistent(engine):
    session = ChatSession(engine)
    history = [user("Tell me a long story")]
    prompt = engine.tokenizer.chat_tokens(history)
    replies = session.respond(history, Settings(temperature=0.0, max_tokens=500))
    for n, (_, text, stats) in enumerate(replies, start=1):
        assert stats.finish_reason is None and stats.generated_tokens == n
        if n == 5:
            break
    assert engine.stats()["running"] == 1  # the row still decodes in the batch
    replies.close()  # what Gradio does on Stop: GeneratorExit in the generator: the request is cancelled
    n = session.stats.generated_tokens  # the row may have run a few steps ahead of the reader
    assert session.stats.finish_reason == "stopped" and 5 <= n < 500
    assert session.answer.startswith(text)
    assert session.tokens == prompt + reference(engine, prompt, n)  # the cache keeps every generated token
    check_consistent(session)
    # The partial answer is the assistant's turn: the next turn continues the cache.
    history += [assistant(session.answer), user("go on")]
    feed, reused = session.plan(history)
    assert reused and feed[1] == engine.tokenizer.eos_id
    answer(session, history)
    check_consistent(session)


def test_stop_when_the_browser_missed_the_last_tokens_rebuilds(engine):
    """Gradio drops the value in flight when Stop lands: the history then ends a token short."""
    session = ChatSession(engine)
    history = [user("Tell me a long story")]
    texts = []
    replies = session.respond(history, Settings(temperature=0.0, max_tokens=500))
    for _, text, _ in replies:
        texts.append(text)
        if len(texts) == 6:
            break
    replies.close()
    history += [assistant(texts[-2]), user("go on")]
    assert not session.plan(history)[1]
    answer(session, history)
    assert session.stats.reused_tokens == 0
    check_consistent(session)


def test_stop_before_the_first_token_changes_nothing(engine):
    session = ChatSession(engine)
    history = [user("hi")]
    text, _ = answer(session, history)
    held = list(session.tokens)
    replies = session.respond(history + [assistant(text), user("next")], GREEDY)
    replies.close()  # never started: nothing fed, nothing locked
    assert session.tokens == held
    check_consistent(session)


def test_two_tabs_answer_at_once_in_one_batch(engine):
    """b's answer does not wait for a's: both rows decode in the same steps, and each answer
    equals the one it gets alone."""
    a, b = ChatSession(engine), ChatSession(engine)
    before = engine.stats()
    replies = a.respond([user("first")], Settings(temperature=0.0, max_tokens=40))
    next(replies)
    _, b_generated = answer(b, [user("second")])  # while a's row goes on
    assert engine.stats()["running"] == 1 and a.stats is None  # a's answer is not over
    list(replies)
    after = engine.stats()
    assert after["rows"] - before["rows"] > after["steps"] - before["steps"]  # a step ran with both rows
    a_generated = a.tokens[-a.stats.generated_tokens:]
    assert a.stats.generated_tokens == 40
    assert a_generated == reference(engine, engine.tokenizer.chat_tokens([user("first")]), 40)
    assert b_generated == reference(engine, engine.tokenizer.chat_tokens([user("second")]), GREEDY.max_tokens)
    check_consistent(a)
    check_consistent(b)


def test_long_message_far_past_the_window_answers_in_flat_memory(engine):
    session = ChatSession(engine)
    answer(session, [user("short")])
    short = session.stats
    text, generated = answer(session, [user("word " * 3000 + "NUL \0 and emoji 🎉\0")])
    long = session.stats
    assert long.prompt_tokens > 40 * engine.window and generated
    assert long.kv_bytes == short.kv_bytes and long.kv_tokens == engine.window
    # the prefix cache's blocks (its window's worth per 128 tokens) are a cache of their own,
    # bounded by --prompt-cache-mib, not the row's: the row's memory stays flat
    blocks = engine.stats()["block_bytes"]
    assert 0 < blocks <= engine.prefixes.blocks.max_bytes
    assert long.peak_memory - blocks < short.peak_memory * 1.05
    check_consistent(session)


def test_closing_a_session_frees_its_cache(engine):
    store = SessionStore(engine)
    session = store.get("browser-1")
    assert store.get("browser-1") is session and store.get("browser-2") is not session
    answer(session, [user("hi")])
    cache = weakref.ref(session.cache)
    store.close("browser-1")
    gc.collect()
    assert cache() is None and "browser-1" not in store.sessions
    store.close("never-opened")  # no error
    tab = store.get("browser-2")
    replies = tab.respond([user("Tell me a long story")], Settings(temperature=0.0, max_tokens=500))
    next(replies)
    store.close("browser-2")  # the tab closes mid-answer: its request is cancelled
    list(replies)
    assert tab.stats.finish_reason == "stopped" and tab.stats.generated_tokens < 500
    assert tab.cache is None  # and its cache dropped
    idle(engine)


def kept(store):
    """The sessions whose cache the scheduler keeps, least recently answered first."""
    names = {session: name for name, session in store.sessions.items()}
    return [names[key] for key in store.engine.prefixes.keys() if key in names]


def test_only_the_most_recent_sessions_keep_a_cache():
    engine = Engine("demo", max_idle=2)
    try:
        store = SessionStore(engine)
        history = [user("hi")]
        for name in "abc":
            text, _ = answer(store.get(name), history)
        assert kept(store) == ["b", "c"] and store.get("a").cache is None
        a = store.get("a")  # a comes back: its cache was dropped, rebuilt from its history
        answer(a, history + [assistant(text), user("again")])
        assert a.stats.reused_tokens == 0
        assert kept(store) == ["c", "a"]  # b was the least recently used
        check_consistent(a)
    finally:
        engine.close()


def test_errors_are_mistral_errors_and_leave_the_session_usable(engine):
    session = ChatSession(engine)
    with pytest.raises(MistralError, match="top_p"):
        next(session.respond([user("hi")], Settings(top_p=0.0)))
    with pytest.raises(MistralError, match="end with a user message"):
        next(session.respond([user("hi"), assistant("hello")], GREEDY))
    with pytest.raises(MistralError, match="repetition_penalty must be > 0"):
        next(session.respond([user("hi")], Settings(repetition_penalty=0.0)))
    idle(engine)
    answer(session, [user("hi")])
    check_consistent(session)


def test_describe_reports_the_window_only_once_it_is_passed():
    stats = TurnStats(prompt_tokens=9, reused_tokens=0, conversation_tokens=40, generated_tokens=31,
                      generation_tps=50.0, ttft=0.034, peak_memory=75 * 2**20, kv_bytes=131072,
                      kv_capacity=64, kv_tokens=40, window=64, finish_reason="stop")
    text = describe(stats)
    for expected in ("31 tokens, finished", "50.0 tok/s", "34 ms", "9 tokens prefilled",
                     "40 / 64 tokens", "80.0 KiB used of 128.0 KiB allocated", "75.0 MiB"):
        assert expected in text
    assert "Past" not in text
    stats.conversation_tokens, stats.kv_tokens, stats.window = 9000, 8192, None
    stats.kv_capacity, stats.kv_bytes = 8192, 2**30
    assert "Past the 8192-token KV cache (--max-kv-size)" in describe(stats)


def test_windowless_model_gets_a_bounded_cache(tmp_path):
    write_hf(tmp_path, tiny_config(sliding_window=None, max_position_embeddings=32768))
    engine = Engine(str(tmp_path))
    try:
        assert engine.window is None and engine.max_kv_size == 8192
        assert engine.capacity == 8192  # the slots of every row's cache
    finally:
        engine.close()
    small = Engine(str(tmp_path), max_kv_size=16)
    try:
        session = ChatSession(small)
        history = [user("a question long enough to pass sixteen tokens of cache")]
        with pytest.warns(UserWarning, match="passed the KV cache capacity"):  # once per cache
            text, _ = answer(session, history)
        history += [assistant(text), user("next")]
        answer(session, history)
        assert session.stats.reused_tokens and session.stats.kv_capacity == 16 and session.stats.rolled
        check_consistent(session)
    finally:
        small.close()


def test_missing_model_refuses_to_start():
    run = subprocess.run([sys.executable, "-m", "app", "--model", "/no/such/model", "--port", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == ("error: model '/no/such/model' does not exist (expected a "
                                                   "directory, a .gguf file, a Hub repo id, 'smollm2' or 'demo')")
    assert "Running on" not in run.stdout


def test_non_loopback_host_warns(capsys):
    from app.__main__ import is_loopback, main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert main(["--host", "0.0.0.0", "--model", "/no/such/model"]) == 2  # the warning, then no server
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: listening on 0.0.0.0: anyone who can reach this address")
    assert main(["--model", "/no/such/model"]) == 2
    assert not any(line.startswith("warning") for line in capsys.readouterr().err.splitlines())


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on: from /proc on Linux, else lsof."""
    if not Path("/proc/net/tcp").exists():  # macOS
        out = subprocess.run(["lsof", "-a", "-p", str(pid), "-iTCP", "-sTCP:LISTEN", "-P", "-n", "-Fn"],
                             capture_output=True, text=True, timeout=30).stdout
        return {(host.strip("[]"), int(port)) for host, port in
                (line[1:].rsplit(":", 1) for line in out.splitlines() if line.startswith("n"))}
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)  # little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((str(ipaddress.ip_address(words)), int(port, 16)))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("moment", ["loading", "serving"])
def test_ctrl_c_exits_130_and_serves_on_loopback_only(moment):
    """A real `python -m app` and a real SIGINT, while the model loads and while it serves:
    exit 130, one `[interrupted]` line, no traceback, no share link; it listens on 127.0.0.1 only."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-u", "-m", "app", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    out, err = [], []
    for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=lambda s=stream, k=sink: [(k.append(x), lines.put(x)) for x in s],
                         daemon=True).start()
    try:
        marker = "loading demo..." if moment == "loading" else "Running on local URL"
        deadline = time.monotonic() + 120
        while marker not in "".join(out + err):
            lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if moment == "serving":
            assert listening_addresses(proc.pid) == {("127.0.0.1", port)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.2)  # the reader threads see the end of the pipes
    stdout, stderr = "".join(out), "".join(err)
    assert "Traceback" not in stderr and "Keyboard interruption" not in stdout
    assert stderr.strip().splitlines()[-1] == "[interrupted]" and stderr.count("[interrupted]") == 1
    assert "gradio.live" not in stdout and "public URL" not in stdout
    assert ("Running on" in stdout) == (moment == "serving")


def test_at_most_four_idle_caches_with_six_sessions(engine):
    """The default store: six sessions answer in turn; only the four most recent keep a cache,
    and the two older caches are freed (no reference left)."""
    store = SessionStore(engine)
    assert engine.max_idle == 4
    caches = []
    for name in "abcdef":
        answer(store.get(name), [user("hi")])
        caches.append(weakref.ref(store.sessions[name].cache))
    gc.collect()
    assert kept(store) == list("cdef")
    assert [c() is None for c in caches] == [True, True, False, False, False, False]
