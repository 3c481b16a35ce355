"""python -m app: the local chat in the browser (Gradio), on 127.0.0.1 unless told otherwise."""

import argparse
import sys

from mlx_mistral.cache import check_kv_bits
from mlx_mistral.demo import NOTICE
from mlx_mistral import speculative
from mlx_mistral.errors import run_command
from mlx_mistral.loading.gguf_blocks import GGUF_BITS_HELP
from mlx_mistral.serve import create_app
from mlx_mistral.server import check_host, check_port, is_loopback, serve as serve_api


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo",
                   help="local directory, .gguf file, Hugging Face repo id, 'smollm2' (the installed SmolLM2 GGUF) or 'demo' (the default)")
    p.add_argument("--gguf-bits", type=int, choices=(4, 8, 16), help=GGUF_BITS_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-kv-size", type=int,
                   help="KV cache slots per session (default: the sliding window, or 8192 without one)")
    p.add_argument("--kv-bits", type=int, help="store the KV cache quantized to 8 or 4 bits (default: float)")
    p.add_argument("--kv-group-size", type=int, default=64, help="KV quantization group along head_dim")
    speculative.add_arguments(p)
    p.add_argument("--api", action="store_true",
                   help="also serve the OpenAI-compatible API at /v1 on the same port, with the same model")
    p.add_argument("--api-key", help="with --api: required as 'Authorization: Bearer KEY' on /v1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_kv_size is not None and args.max_kv_size <= 0:
        print(f"error: --max-kv-size must be a positive integer, got {args.max_kv_size}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this address can use the model "
              "and read the chats (there is no login)", file=sys.stderr)
    if args.model == "demo":
        print(NOTICE, file=sys.stderr)
    return run_command(lambda: run(args))  # Ctrl-C, while loading or serving: one line, exit 130


def run(args: argparse.Namespace) -> int:
    check_kv_bits(args.kv_bits, args.kv_group_size)  # before the model loads
    lookup = speculative.from_arguments(args)
    check_port(args.host, args.port)
    if args.api:
        check_host(args.host, args.api_key)
    from .chat import Engine

    print(f"loading {args.model}...", file=sys.stderr, flush=True)
    engine = Engine(args.model, args.max_kv_size, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                    gguf_bits=args.gguf_bits, lookup=lookup, draft_model=args.draft_model,
                    draft_tokens=args.draft_tokens)
    try:
        from .ui import build, serve

        if not args.api:
            serve(build(engine), args.host, args.port)
            return 0
        import gradio as gr

        api = gr.mount_gradio_app(create_app(engine, args.api_key), build(engine), path="/", ssr_mode=False,
                                  footer_links=["api", "settings"])
        serve_api(api, args.host, args.port)  # the page at /, the API at /v1: one model, one scheduler
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
