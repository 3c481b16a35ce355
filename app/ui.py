"""The Gradio Blocks layout: a ChatInterface, and a sidebar with the stats panel and the knobs."""

import os
import time
from contextlib import closing

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check at start

import gradio as gr  # noqa: E402

from .chat import Engine, MistralError, SessionStore, Settings, describe, plain_messages, reply  # noqa: E402

STATS_EVERY = 32  # tokens between live stats updates while streaming
NOTICE = ("The `demo` model has random weights: its answers are gibberish. "
          "Start the app with `--model PATH_OR_REPO` for a real one.")


def build(engine: Engine, store: SessionStore | None = None) -> gr.Blocks:
    store = store or SessionStore(engine)

    def chat(message: str, history: list[dict], system: str, temperature: float, top_p: float,
             max_tokens: float, repetition_penalty: float, seed: float | None, request: gr.Request):
        if not message.strip():  # ignored (the browser's validator stops it before it gets here)
            return
        session = store.get(request.session_hash)
        messages = plain_messages(history, system) + [{"role": "user", "content": message}]
        settings = Settings(temperature, top_p, int(max_tokens), repetition_penalty,
                            None if seed is None else int(seed))
        reasoning = text = ""
        try:
            with closing(session.respond(messages, settings)) as replies:  # Stop closes it at once
                for n, (reasoning, text, stats) in enumerate(replies):
                    yield reply(reasoning, text), describe(stats) if n % STATS_EVERY == 0 else gr.skip()
        except MistralError as e:
            raise gr.Error(str(e)) from None
        yield reply(reasoning, text, done=True), describe(session.stats) if session.stats else gr.skip()

    def stats_after_stop(request: gr.Request) -> str:
        """Stop closes the chat generator, which can yield no more: show its final stats here."""
        session = store.sessions.get(request.session_hash)
        if session is None:
            return gr.skip()
        running = session.request
        if running is not None:  # at once, even while its prompt is still being prefilled
            running.cancel()
        if session.answering.acquire(timeout=30):  # held until the stopped generator has closed
            session.answering.release()
        return describe(session.stats) if session.stats else gr.skip()

    def free_session(request: gr.Request) -> None:
        store.close(request.session_hash)

    with gr.Blocks(title="mlx-mistral chat", fill_height=True) as demo:
        stats, knobs = sidebar(engine)
        if engine.name == "demo":
            gr.Markdown(NOTICE)
        chat_ui = gr.ChatInterface(
            chat,
            chatbot=gr.Chatbot(buttons=["copy", "copy_all"], label="Chat", scale=1, height="70vh",
                               elem_id="chatbot"),
            textbox=gr.Textbox(placeholder="Type a message...", show_label=False, elem_id="message",
                               submit_btn=True, stop_btn=True, scale=7, autofocus=True),
            additional_inputs=knobs,
            additional_outputs=[stats],
            editable=True,
            validator=lambda message: gr.validate(bool(message.strip()), "Type a message first."),
            api_name="chat",
            concurrency_limit=engine.max_batch,  # tabs answer at once, in the scheduler's batch
            analytics_enabled=False,
            fill_height=True,
        )
        chat_ui.textbox.stop(stats_after_stop, None, stats, api_visibility="private")
        chat_ui.chatbot.clear(free_session, None, None, api_visibility="private")
        demo.unload(free_session)
    demo.store = store  # the app's sessions, for tests and for the curious
    return demo


def sidebar(engine: Engine) -> tuple[gr.Markdown, list[gr.components.Component]]:
    """The right sidebar: the model's line, the stats panel, and the knobs that chat() takes
    after the message and history (system prompt, temperature, top-p, max tokens, repetition
    penalty, seed)."""
    window = "per-layer sliding windows" if engine.model.args.layer_windows else \
        f"{engine.window}-token sliding window" if engine.window else "no sliding window"
    with gr.Sidebar(position="right", width=420, open=True):
        gr.Markdown(f"**Model** `{engine.name}` · {window} · KV cache of {engine.capacity} tokens")
        stats = gr.Markdown("Stats appear after the first answer.", elem_id="stats")
        system = gr.Textbox(label="System prompt", lines=3, elem_id="system",
                            placeholder="You are a helpful assistant.")
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                elem_id="temperature")
        top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
        max_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max new tokens", elem_id="max-tokens")
        repetition_penalty = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty", info="1 = off")
        seed = gr.Number(value=0, precision=0, label="Seed", info="empty = random")
    return stats, [system, temperature, top_p, max_tokens, repetition_penalty, seed]


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Serve on host:port: no share link, no server-side rendering (no Node), nothing from the internet."""
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                       inbrowser=False, footer_links=["api", "settings"], **kwargs)


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None) -> None:
    """launch(), then wait here rather than in Gradio's loop (which swallows Ctrl-C and returns):
    the KeyboardInterrupt goes on to the caller once the server is closed."""
    launch(demo, host, port, prevent_thread_lock=True)
    try:
        while demo.is_running:
            time.sleep(0.1)
    finally:
        demo.close(verbose=False)
