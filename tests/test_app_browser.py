"""The app served on 127.0.0.1, driven by Debian's Chromium (Playwright) and by gradio_client.

Needs `apt-get install chromium` and `pip install "gradio>=6.31,<6.32" playwright gradio_client`
(installed by .ci/run; never `playwright install`). A missing browser fails these tests: it
never skips them. APP_SCREENSHOT=docs/app.png also writes the multi-turn screenshot there.
"""

import os
import shutil
import socket
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from gradio_client import Client  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from app.chat import Engine  # noqa: E402
from app.ui import build, launch  # noqa: E402
from mlx_mistral import generate, make_sampler  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
MAX_TOKENS = 24
BOT = '[data-testid="bot"]'
STATS = "#stats"
WATCH_BOT = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
  }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def app():
    engine = Engine("demo")
    demo = build(engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield engine, demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        engine.close()


@pytest.fixture(scope="module")
def expected(app):
    """What the public API answers to "hi" with greedy sampling, straight from the model."""
    engine = app[0]
    prompt = engine.tokenizer.chat_tokens([{"role": "user", "content": "hi"}])
    text = engine.call(generate, engine.model, engine.tokenizer, prompt, max_tokens=MAX_TOKENS,
                       sampler=make_sampler(0.0, seed=0))
    # Markdown would restyle these; the prompt was picked so that the answer has none.
    assert text.strip() and not set(text) & set("\\`*_[]<>#|~$&"), text
    return text


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run .ci/run, or apt-get install chromium")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture()
def page(browser, app):
    page = browser.new_page()
    page.offsite = []

    def local_only(route):
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:  # the app must fetch nothing from the internet: record and refuse
            page.offsite.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    before = set(app[1].store.sessions)
    page.goto(app[2])
    page.locator("#message textarea").wait_for(timeout=30_000)
    page.session = lambda: app[1].store.sessions[(set(app[1].store.sessions) - before).pop()]
    yield page
    assert page.offsite == []
    if not page.is_closed():
        page.close()


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator('[data-testid="submit-button"]').click()


def wait_answer(page, turn: int) -> str:
    """Wait until the session's `turn`-th answer has ended (its stats shown, input usable); its text."""
    page.wait_for_function(
        f"() => /Answer {turn}\\s+\\d+ tokens, (finished|hit max new tokens)/"
        ".test(document.querySelector('#stats').innerText)",
        timeout=60_000,
    )
    expect(page.locator("#message textarea")).to_be_editable(timeout=30_000)
    return page.locator(BOT).last.inner_text()


def stats(page) -> str:
    return page.locator(STATS).inner_text()


def test_multi_turn_chat_in_the_browser(page, app, expected, tmp_path):
    engine = app[0]
    set_number(page, "Temperature", 0)
    set_number(page, "Max new tokens", MAX_TOKENS)
    page.evaluate(WATCH_BOT)  # records every text the streamed answer shows
    send(page, "hi")
    final = words(wait_answer(page, 1))
    assert final == words(expected)
    seen = {words(t) for t in page.evaluate("window.seen")}
    partials = seen - {final, ""}
    assert partials and all(final.startswith(p) for p in partials), seen
    session = page.session()
    first_turn = len(session.tokens)
    assert f"{MAX_TOKENS} tokens, hit max new tokens" in stats(page)
    assert f"{first_turn - MAX_TOKENS} tokens prefilled, 0 reused" in stats(page)

    send(page, "and again")  # turn 2 continues the cache (all of turn 1 but its last token, not fed yet)
    answer2 = wait_answer(page, 2)
    assert f"{first_turn - 1} reused from the cache" in stats(page)
    assert session.cache.offset == len(session.tokens) - 1 > engine.window
    assert f"Past the {engine.window}-token sliding window" in stats(page)
    assert "128.0 KiB allocated" in stats(page)  # 4 layers x K,V x 2 heads x 64 slots x 32 x 4 bytes

    page.get_by_role("button", name="Retry").last.click()  # regenerate: the cache is rebuilt
    assert wait_answer(page, 3) == answer2  # greedy: the same answer again
    assert " 0 reused" in stats(page)
    send(page, "one more time")
    wait_answer(page, 4)
    assert "128.0 KiB allocated" in stats(page) and session.cache.offset == len(session.tokens) - 1
    assert page.locator(BOT).count() == 3 and page.locator('[data-testid="user"]').count() == 3
    page.wait_for_timeout(400)  # the input row's fade
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copy(shot, os.environ["APP_SCREENSHOT"])


def test_stop_ends_streaming_and_keeps_the_partial_answer(page, app):
    engine = app[0]
    set_number(page, "Temperature", 0)
    set_number(page, "Max new tokens", 4096)
    send(page, "Tell me a very long story")
    page.wait_for_function(
        "sel => { const b = document.querySelectorAll(sel);"
        " return b.length && b[0].innerText.split(' ').length >= 8; }",
        arg=BOT, timeout=30_000,
    )
    page.locator('[data-testid="stop-button"]').click()
    page.wait_for_function(
        "() => /Answer 1\\s+\\d+ tokens, stopped/.test(document.querySelector('#stats').innerText)",
        timeout=30_000,
    )
    frozen = page.locator(BOT).last.inner_text()
    time.sleep(1.5)
    assert page.locator(BOT).last.inner_text() == frozen and frozen.strip()
    page.locator('[data-testid="submit-button"]').wait_for(timeout=10_000)
    session = page.session()
    assert engine.stats()["running"] == 0  # the request was cancelled: its row left the batch
    assert session.stats.finish_reason == "stopped" and 8 <= session.stats.generated_tokens < 4096
    assert session.cache.offset == len(session.tokens) - 1  # the cache keeps what was generated

    set_number(page, "Max new tokens", 8)
    send(page, "go on")  # the partial answer stays in the conversation
    wait_answer(page, 2)
    assert page.locator(BOT).first.inner_text() == frozen
    assert session.cache.offset == len(session.tokens) - 1


def test_empty_message_undo_and_a_closed_tab(page, app):
    for text in ("", "   "):
        send(page, text)
        page.wait_for_timeout(500)
        assert page.locator('[data-testid="user"]').count() == 0 and page.locator(BOT).count() == 0
    set_number(page, "Max new tokens", 4)
    send(page, "hi")  # the app is still fine
    wait_answer(page, 1)
    page.get_by_role("button", name="Undo").click()  # the turn goes back into the textbox
    expect(page.locator(BOT)).to_have_count(0)
    expect(page.locator("#message textarea")).to_have_value("hi")
    session = page.session()
    page.close()  # closing the tab ends the session and frees its cache
    deadline = time.time() + 20
    while session in app[1].store.sessions.values():
        assert time.time() < deadline, "the closed session kept its cache"
        time.sleep(0.1)
    assert session.cache is None


def test_gradio_client_chat(app, expected):
    engine, demo, url = app
    client = Client(url, verbose=False)
    assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    knobs = dict(system="", temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, repetition_penalty=1.0,
                 seed=0, api_name="/chat")
    text, panel = client.predict("hi", **knobs)
    assert text == expected and "0 reused" in panel
    short = demo.store.sessions[client.session_hash].stats
    text, panel = client.predict("and again", **knobs)  # the server keeps this client's history
    assert text and " 0 reused" not in panel
    empty = client.predict("   ", **knobs)  # ignored, no crash
    assert empty[0] in (None, "")
    client.reset_session()
    text, panel = client.predict("word " * 3000, **knobs)  # ~47 windows of text in one message
    assert text and "3009 tokens prefilled" in panel
    assert "64 / 64 tokens, 128.0 KiB used of 128.0 KiB allocated" in panel
    long = demo.store.sessions[client.session_hash].stats
    blocks = engine.stats()["block_bytes"]  # the prefix cache's own budget (--prompt-cache-mib), not the row's
    assert long.kv_bytes == short.kv_bytes and long.peak_memory - blocks < 1.05 * short.peak_memory  # flat
    client.close()


def test_a_tab_and_an_api_client_answer_at_once_from_one_model(browser, expected):
    """`python -m app --api`: a Chromium tab chats while an `openai` client streams from /v1.
    Both answer, in the same decode steps, each as it answers alone; one scheduler, one model
    loaded once, served them both."""
    import openai
    from test_server import Server

    server = Server("--api", module="app")
    page = browser.new_page()
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else route.abort())
    try:
        server.wait()
        page.goto(server.url + "/")
        page.locator("#message textarea").wait_for(timeout=30_000)
        set_number(page, "Temperature", 0)
        set_number(page, "Max new tokens", MAX_TOKENS)
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model="demo", messages=[{"role": "user", "content": "hello"}], temperature=0,
                  max_tokens=600)  # streams for seconds after the tab's answer has begun
        stream = api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        chunks = [next(stream)]  # the API's row is decoding
        send(page, "hi")
        tab = wait_answer(page, 1)
        chunks += list(stream)
        streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        assert words(tab) == words(expected)
        assert streamed == api.chat.completions.create(**kw).choices[0].message.content  # alone, afterwards
        metrics = server.metrics()
        assert metrics["mlx_mistral_decode_rows_max"] >= 2  # the tab's row and the API's in one step
        assert metrics["mlx_mistral_generated_tokens_total"] == \
            MAX_TOKENS + 2 * chunks[-1].usage.completion_tokens  # the tab's and the API's two answers
    finally:
        page.close()
        assert server.stop() == 130
    assert server.proc.stderr.read().count("loading demo...") == 1
