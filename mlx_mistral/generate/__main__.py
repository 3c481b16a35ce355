"""python -m mlx_mistral.generate: stream an answer from the command line.

A thin consumer of the public API: load -> chat_tokens -> stream_generate.
"""

import argparse
import json
import sys
import traceback
import warnings

from .. import load, make_sampler, stream_generate
from ..demo import NOTICE
from ..errors import MistralError
from . import DEFAULT_PREFILL_CHUNK, GenerationResponse

DTYPES = ("float16", "bfloat16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_mistral.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local directory, Hugging Face repo id, or 'demo'")
    p.add_argument("--prompt", required=True, help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", help="system prompt (ignored with --raw)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-kv-size", type=int, help="KV cache slots (default: the window, or what the request needs)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens per prefill step")
    p.add_argument("--dtype", choices=DTYPES, help="activation dtype (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--json", action="store_true", help="print the result and stats as one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MistralError(f"prompt from stdin is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def stats_line(r: GenerationResponse) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"ttft {r.ttft:.3f} s | peak memory {r.peak_memory / 2**20:.1f} MiB | "
        f"KV cache {r.kv_cache_bytes / 2**20:.2f} MiB allocated, {r.kv_cache_tokens} tokens held"
    )


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    prompt = read_prompt(args.prompt)
    sampler = make_sampler(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
    if args.model == "demo":
        print(NOTICE, file=sys.stderr)
    model, tokenizer = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    if args.raw:
        tokens = prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        tokens = tokenizer.chat_tokens(messages + [{"role": "user", "content": prompt}])
        if not prompt.strip():
            raise MistralError("prompt is empty")
    text, ids, last = [], [], None
    try:
        for last in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens, sampler=sampler,
                                    repetition_penalty=args.repetition_penalty, stop=args.stop,
                                    max_kv_size=args.max_kv_size, prefill_chunk=args.prefill_chunk):
            text.append(last.text)
            ids.append(last.token)
            if not args.json:
                print(last.text, end="", flush=True)
    except KeyboardInterrupt:
        if last is not None:
            print(f"\n[interrupted] {stats_line(last)}", file=sys.stderr)
        return 130
    if args.json:
        result = {**vars(last), "text": "".join(text), "tokens": ids}
        del result["token"]  # the last one is in "tokens"
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(file=sys.stdout)
        print(stats_line(last), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    try:
        return run(args)
    except MistralError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything unforeseen: one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
