"""python -m mlx_mistral.server: an OpenAI-compatible API (chat, completions, models) on 127.0.0.1.

The command line only: its flags, the host and port checks, and the start. What serves is
the mlx_mistral.serve package (the scheduler, the prefix cache, the HTTP app, the OpenAI routes).
"""

import argparse
import ipaddress
import socket
import sys
import threading
from concurrent.futures import Future

from fastapi import FastAPI

from . import speculative
from .cache import check_kv_bits
from .errors import MistralError, run_command
from .generate import DEFAULT_PREFILL_CHUNK
from .loading.gguf_blocks import GGUF_BITS_HELP
from .serve import Scheduler, create_app
from .serve.app import served_name
from .serve.disk_cache import check_directory
from .serve.scheduler import DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_PROMPT_CACHE_DISK_BYTES

__all__ = ["check_host", "check_port", "create_app", "is_loopback", "main", "serve"]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_mistral.server", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="local directory, .gguf file, Hugging Face repo id (org/name, org/name/FILE.gguf), 'smollm2' (the installed SmolLM2 GGUF) or 'demo'")
    p.add_argument("--gguf-bits", type=int, choices=(4, 8, 16), help=GGUF_BITS_HELP)
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="a name the model answers to in /v1/models and responses (repeatable; default: the "
                   "directory's, file's or repo's name). Requests naming any other model are served by it too")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond them; past it, 429")
    p.add_argument("--max-kv-size", type=int,
                   help="KV cache slots per row (default: the sliding window, or 8192)")
    p.add_argument("--kv-budget-mib", type=int,
                   help="admit rows only while their KV caches (and the idle ones) fit in this many MiB")
    p.add_argument("--kv-bits", type=int, help="store each row's KV cache quantized to 8 or 4 bits (default: float)")
    p.add_argument("--kv-group-size", type=int, default=64, help="KV quantization group along head_dim")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens prefilled between two decode steps (default %(default)s)")
    p.add_argument("--max-idle", type=int, default=4,
                   help="finished requests' caches kept for the next turn of their conversation (default 4)")
    p.add_argument("--prompt-cache-mib", type=int, default=DEFAULT_PROMPT_CACHE_BYTES >> 20,
                   help="MiB of K/V blocks kept for any request whose prompt starts the same "
                        "(default %(default)s; 0: none; counted in --kv-budget-mib)")
    p.add_argument("--prompt-cache-dir", help="also keep the blocks in this directory, across restarts")
    p.add_argument("--prompt-cache-gb", type=float, default=DEFAULT_PROMPT_CACHE_DISK_BYTES / 10**9,
                   help="at most this many GB of blocks in --prompt-cache-dir (default %(default)s)")
    speculative.add_arguments(p)  # rows speculate on their own, in the batch ("speculative": false opts out)
    p.add_argument("--reasoning", action="store_true",
                   help="start every chat with the model's reasoning system prompt (reasoning models: Magistral)")
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                   "(required off loopback)")
    p.add_argument("--cors-origin", help="allow browser pages from this origin (default: no CORS)")
    p.add_argument("--log-requests", action="store_true",
                   help="print a line per request: its messages' roles and its prompt tokens (what the model was given)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise MistralError(f"--host {host} is reachable from other machines: pass --api-key KEY too")


def check_port(host: str, port: int) -> None:
    """Fail now, with one line, if host:port cannot be listened on (in use, not an address here),
    rather than after the model has loaded."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as uvicorn and Gradio bind
            pass
    except (OSError, OverflowError) as e:
        raise MistralError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(app: FastAPI, host: str, port: int) -> None:
    """(python -m app --api) Run `app` with uvicorn until Ctrl-C (or SIGTERM) stops it, then raise
    KeyboardInterrupt."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        check_host(args.host, args.api_key)
        check_port(args.host, args.port)
        for flag in ("max_batch", "max_queue", "prefill_chunk", "max_kv_size", "kv_budget_mib"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise MistralError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        for flag in ("max_idle", "prompt_cache_mib"):
            if getattr(args, flag) < 0:
                raise MistralError(f"--{flag.replace('_', '-')} must be an integer >= 0, got {getattr(args, flag)}")
        if not args.prompt_cache_gb > 0:
            raise MistralError(f"--prompt-cache-gb must be a positive number of GB, got {args.prompt_cache_gb:g}")
        if args.served_model_name and not all(n.strip() for n in args.served_model_name):
            raise MistralError("--served-model-name must not be empty")
        if args.prompt_cache_dir is not None:
            check_directory(args.prompt_cache_dir)
        check_kv_bits(args.kv_bits, args.kv_group_size)  # before the model loads
        lookup = speculative.from_arguments(args)
        loading: Future = Future()  # the API answers 503 until the model is loaded

        def load() -> None:
            try:
                budget = args.kv_budget_mib and args.kv_budget_mib << 20
                scheduler = Scheduler(args.model, args.max_kv_size, args.max_batch, args.max_queue, budget,
                                      prefill_chunk=args.prefill_chunk, max_idle=args.max_idle,
                                      kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                                      prompt_cache_bytes=args.prompt_cache_mib << 20,
                                      prompt_cache_dir=args.prompt_cache_dir,
                                      prompt_cache_disk_bytes=int(args.prompt_cache_gb * 10**9),
                                      gguf_bits=args.gguf_bits, lookup=lookup, draft_model=args.draft_model,
                                      draft_tokens=args.draft_tokens)
                if args.reasoning:
                    try:
                        scheduler.tokenizer.reasoning_prompt()  # MistralError unless the model has one
                    except MistralError:
                        scheduler.close()
                        raise
                loading.set_result(scheduler)
            except BaseException as e:
                loading.set_exception(e)
                server.should_exit = True

        import uvicorn
        names = args.served_model_name or [served_name(args.model)]
        app = create_app(loading, args.api_key, args.cors_origin, name=names, reasoning=args.reasoning,
                         log_requests=args.log_requests)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        threading.Thread(target=load, name="load").start()
        print(f"serving {args.model} as {', '.join(names)} on http://{args.host}:{args.port}/v1", file=sys.stderr,
              flush=True)
        server.run()
        loading.result().close()  # waits for a load in progress; a model that failed to load: its error
        raise KeyboardInterrupt  # uvicorn returns once Ctrl-C (or SIGTERM) has stopped it

    return run_command(run, args.debug, "[server stopped]")


if __name__ == "__main__":
    sys.exit(main())
