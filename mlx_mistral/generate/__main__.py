"""python -m mlx_mistral.generate: stream an answer from the command line.

A thin consumer of the public API: load -> chat_tokens -> stream_generate.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from .. import (
    Constraint, Grammars, batch_stream_generate, distributed, load, make_sampler, speculative,
    stream_generate,
)
from ..demo import NOTICE
from ..distributed import DEFAULT_CONNECT_TIMEOUT
from ..errors import MistralError, run_command
from ..images import image_part
from ..loading.gguf_blocks import GGUF_BITS_HELP
from ..speculative import load_draft
from . import DEFAULT_PREFILL_CHUNK, GenerationResponse

DTYPES = ("float16", "bfloat16", "float32")
DIM, RESET = "\x1b[2m", "\x1b[0m"  # a reasoning model's reasoning, on a terminal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_mistral.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local directory, .gguf file, Hugging Face repo id (org/name, org/name/FILE.gguf), 'smollm2' (the installed SmolLM2 GGUF) or 'demo'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the user message ('-' reads it from stdin)")
    source.add_argument("--prompts-file", help="many prompts decoded as one batch: one per line, or JSONL "
                        'lines {"prompt": ..., "max_tokens": ...}')
    p.add_argument("--system", help="system prompt (ignored with --raw)")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image the question is about (repeatable, in order, after the prompt's text); "
                   "an image model: Pixtral, Mistral Small 3.x, Magistral 1.2, Ministral 3")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--reasoning", action="store_true", help="start with the model's reasoning system prompt "
                   "(reasoning models: Magistral); the reasoning is printed apart, and under \"reasoning\" with --json")
    p.add_argument("--tools", help="JSON file: a list of OpenAI-style tool definitions the model may call "
                   "(V3 or Tekken tokenizers); the calls are printed, and included with --json")
    p.add_argument("--tool-choice", default="auto", help="auto (the model decides), none, required (a call of "
                   "some tool), or a tool's name (a call of that one): calls follow the tools' schemas")
    answer = p.add_mutually_exclusive_group()
    answer.add_argument("--json-schema", metavar="FILE", help="JSON Schema file: the answer is JSON that matches it")
    answer.add_argument("--json-object", action="store_true", help="the answer is a JSON object (any)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-kv-size", type=int, help="KV cache slots (default: the window, or what the request needs)")
    p.add_argument("--kv-bits", type=int, help="store the KV cache quantized to 8 or 4 bits (default: float)")
    p.add_argument("--kv-group-size", type=int, default=64, help="KV quantization group along head_dim")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens per prefill step")
    p.add_argument("--gguf-bits", type=int, choices=(4, 8, 16), help=GGUF_BITS_HELP)
    p.add_argument("--dtype", choices=DTYPES, help="activation dtype (default: float32 on CPU, the checkpoint's on GPU)")
    speculative.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result and stats as one JSON object")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                   help="under mlx.launch: seconds for every rank to reach the others")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MistralError(f"prompt from stdin is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_prompts_file(path: str, max_tokens: int) -> tuple[list[str], list[int]]:
    """Prompts and their max_tokens: plain lines (blank ones skipped) or JSONL objects."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MistralError(f"--prompts-file {path}: cannot read it ({e})") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise MistralError(f"--prompts-file {path}: no prompts in it")
    if not numbered[0][1].lstrip().startswith("{"):
        return [line for _, line in numbered], [max_tokens] * len(numbered)
    prompts, limits = [], []
    for n, line in numbered:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise MistralError(f"--prompts-file {path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise MistralError(f'--prompts-file {path}, line {n}: expected an object with a "prompt" string')
        prompts.append(item["prompt"])
        limits.append(item.get("max_tokens", max_tokens))
    return prompts, limits


def read_json(path: str, flag: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MistralError(f"{flag} {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise MistralError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_tools(path: str | None) -> list[dict] | None:
    """The tool definitions of --tools: a JSON list of {"type": "function", "function": {...}}."""
    if path is None:
        return None
    tools = read_json(path, "--tools")
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise MistralError(f'--tools {path}: expected a non-empty list of {{"type": "function", "function": {{...}}}}')
    return tools


def make_constraint(args: argparse.Namespace, tokenizer, vocab_size: int) -> Constraint | None:
    """The grammar of --json-schema / --json-object / --tool-choice (None: a free answer)."""
    if args.json_schema:
        response_format = {"type": "json_schema", "json_schema": {"schema": read_json(args.json_schema, "--json-schema")}}
    else:
        response_format = {"type": "json_object"} if args.json_object else None
    choice = args.tool_choice
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    if choice != "auto" and not args.tools:
        raise MistralError("--tool-choice needs --tools")
    try:
        return Grammars(tokenizer, vocab_size).for_chat(response_format, args.tools or [], choice, args.reasoning)
    except MistralError as e:
        field, _, why = str(e).partition(": ")
        flag = {"tool_choice": "--tool-choice", "tools": f"--tools {args.tools_file}"}.get(
            field.split(".")[0], f"--json-schema {args.json_schema}" if args.json_schema else "--json-object")
        raise MistralError(f"{flag}: {why}") from None


def encode(tokenizer, prompt: str, args: argparse.Namespace, what: str = "prompt") -> str | list[int]:
    """The prompt as the model sees it: through the chat template unless --raw."""
    if not prompt.strip():
        raise MistralError(f"{what} is empty")
    if args.raw:
        if args.tools or args.reasoning:
            raise MistralError(f"--{'tools' if args.tools else 'reasoning'} needs the chat template: leave out --raw")
        return prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return tokenizer.chat_tokens(messages + [{"role": "user", "content": prompt}], tools=args.tools,
                                 reasoning=args.reasoning)


def result_fields(r: GenerationResponse) -> dict:
    """A response's fields as JSON values (tool calls in OpenAI's format)."""
    return {**vars(r), "tool_calls": [c.to_openai() for c in r.tool_calls] if r.tool_calls else None,
            "speculation": speculation(r)}


def speculation(r: GenerationResponse) -> dict | None:
    """Speculation's figures (None without it): drafts, the share kept, the mean accepted run
    (accepted drafts per forward that checked drafts), target forwards per emitted token."""
    if not r.forwards:
        return None
    return dict(drafted=r.drafted_tokens, accepted=r.accepted_tokens,
                acceptance_rate=r.accepted_tokens / max(r.drafted_tokens, 1),
                mean_accepted_run=r.accepted_tokens / max(r.drafting_forwards, 1),
                forwards_per_token=r.forwards / max(r.generation_tokens, 1))


class Printer:
    """Prints an answer as it streams: a reasoning model's reasoning first, apart from the answer
    (dimmed when stdout is a terminal, and a line break before the answer)."""

    def __init__(self):
        self.dim, self.reasoned = sys.stdout.isatty(), False

    def __call__(self, reasoning: str, text: str) -> None:
        if reasoning:
            self.reasoned = True
            print(f"{DIM}{reasoning}{RESET}" if self.dim else reasoning, end="", flush=True)
        if text and self.reasoned:
            print()
            self.reasoned = False
        print(text, end="", flush=True)


def print_tool_calls(r: GenerationResponse) -> None:
    for c in r.tool_calls or ():
        print(f"[tool call {c.id}] {c.name} {c.arguments}")


def stats_line(r: GenerationResponse) -> str:
    line = (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"ttft {r.ttft:.3f} s | peak memory {r.peak_memory / 2**20:.1f} MiB | "
        f"KV cache {r.kv_cache_bytes / 2**20:.2f} MiB allocated, {r.kv_cache_tokens} tokens held"
    )
    if r.images:
        line += f" | images: {r.images}, {r.image_tokens} tokens, vision {r.vision_seconds:.3f} s"
    s = speculation(r)
    if s is None:
        return line
    return (f"{line} | speculation: {s['accepted']}/{s['drafted']} drafts accepted "
            f"({s['acceptance_rate']:.0%}), mean run {s['mean_accepted_run']:.2f}, "
            f"{s['forwards_per_token']:.2f} forwards a token")


def encode_images(tokenizer, model, prompt: str, args: argparse.Namespace) -> tuple[list[int], list]:
    """The prompt and --image files through the chat template: (tokens, the images' pixels)."""
    if args.raw:
        raise MistralError("--image needs the chat template: leave out --raw")
    if not model.args.vision:
        raise MistralError(f"--image: {args.model} takes text only (it has no vision tower)")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    content = [{"type": "text", "text": prompt}, *args.image_parts]
    return tokenizer.chat_inputs(messages + [{"role": "user", "content": content}], tools=args.tools,
                                 reasoning=args.reasoning)


def run_single(args: argparse.Namespace, model, tokenizer, sampler) -> int:
    if args.image:
        tokens, images = encode_images(tokenizer, model, read_prompt(args.prompt), args)
    else:
        tokens, images = encode(tokenizer, read_prompt(args.prompt), args), ()
    constraint = make_constraint(args, tokenizer, model.args.vocab_size)
    text, reasoning, ids, last, show = [], [], [], None, Printer()
    try:
        for last in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens, sampler=sampler,
                                    repetition_penalty=args.repetition_penalty, stop=args.stop,
                                    max_kv_size=args.max_kv_size, prefill_chunk=args.prefill_chunk,
                                    kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                                    tool_calls=bool(args.tools), constraint=constraint, lookup=args.lookup,
                                    draft_model=args.draft, draft_tokens=args.draft_tokens, images=images):
            text.append(last.text)
            reasoning.append(last.reasoning)
            ids.append(last.token)
            if not args.json:
                show(last.reasoning, last.text)
    except KeyboardInterrupt:
        if last is not None:
            print(f"\n[interrupted] {stats_line(last)}", file=sys.stderr)
        return 130
    if args.json:
        result = {**result_fields(last), "text": "".join(text), "reasoning": "".join(reasoning), "tokens": ids}
        del result["token"]  # the last one is in "tokens"
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(file=sys.stdout)
        print_tool_calls(last)
        print(stats_line(last), file=sys.stderr)
    return 0


def run_batch(args: argparse.Namespace, model, tokenizer, sampler) -> int:
    if args.repetition_penalty != 1.0:
        raise MistralError("--repetition-penalty is not supported with --prompts-file")
    if args.image:
        raise MistralError("--image is not supported with --prompts-file (one prompt: --prompt)")
    if args.lookup or args.draft_model:
        raise MistralError("--prompt-lookup and --draft-model are not supported with --prompts-file (the "
                           "server speculates in its batch: python -m mlx_mistral.server --prompt-lookup)")
    prompts, limits = read_prompts_file(args.prompts_file, args.max_tokens)
    tokens = [encode(tokenizer, p, args, f"prompt {i} of --prompts-file") for i, p in enumerate(prompts)]
    constraint = make_constraint(args, tokenizer, model.args.vocab_size)
    start = time.perf_counter()
    texts, reasoning, ids = [[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts]
    last, kv_bytes = {}, 0
    for i, r in batch_stream_generate(model, tokenizer, tokens, max_tokens=limits, sampler=sampler,
                                      stop=args.stop, max_kv_size=args.max_kv_size,
                                      prefill_chunk=args.prefill_chunk, kv_bits=args.kv_bits,
                                      kv_group_size=args.kv_group_size, tool_calls=bool(args.tools),
                                      constraint=constraint):
        texts[i].append(r.text)
        reasoning[i].append(r.reasoning)
        ids[i].append(r.token)
        last[i], kv_bytes = r, max(kv_bytes, r.kv_cache_bytes)
    elapsed = time.perf_counter() - start
    generated = sum(r.generation_tokens for r in last.values())
    total = {"prompts": len(prompts), "prompt_tokens": sum(r.prompt_tokens for r in last.values()),
             "generation_tokens": generated, "seconds": elapsed, "tokens_per_second": generated / elapsed,
             "peak_memory": max(r.peak_memory for r in last.values()), "kv_cache_bytes": kv_bytes}
    results = [{**result_fields(last[i]), "index": i, "text": "".join(texts[i]), "reasoning": "".join(reasoning[i]),
                "tokens": ids[i]} for i in range(len(prompts))]
    if args.json:
        for result in results:
            del result["token"]
        print(json.dumps({"results": results, "stats": total}, ensure_ascii=False))
        return 0
    for i, result in enumerate(results):
        print(f"=== [{i}] {prompts[i][:60]!r}")
        Printer()(result["reasoning"], result["text"])
        print()
        print_tool_calls(last[i])
        print(stats_line(last[i]), file=sys.stderr)
    print(f"batch: {len(prompts)} prompts, {generated} tokens in {elapsed:.2f} s = {generated / elapsed:.1f} tok/s | "
          f"peak memory {total['peak_memory'] / 2**20:.1f} MiB | KV cache {kv_bytes / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    group = distributed.init(args.connect_timeout)  # None unless started by mlx.launch
    sampler = make_sampler(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
    args.lookup = speculative.from_arguments(args)  # (MistralError with --draft-model too)
    args.draft = None
    args.image_parts = [image_part(path) for path in args.image or ()]  # checked before loading
    args.tools_file, args.tools = args.tools, read_tools(args.tools)  # its tool definitions, checked before loading
    if args.tool_choice == "none":  # the tools are left out of the prompt, as the server does
        args.tools = None
    if args.model == "demo" and (group is None or group.rank() == 0):
        print(NOTICE, file=sys.stderr)
    dtype = getattr(mx, args.dtype) if args.dtype else None
    command = run_batch if args.prompts_file else run_single
    if group is None:
        model, tokenizer = load(args.model, dtype=dtype, gguf_bits=args.gguf_bits)
        if args.draft_model:
            args.draft = load_draft(args.draft_model, tokenizer, dtype=dtype, gguf_bits=args.gguf_bits)
        return command(args, model, tokenizer, sampler)
    if args.draft_model or args.image:
        flag = "--draft-model" if args.draft_model else "--image"
        raise MistralError(f"{flag} is not supported across several machines (mlx.launch)")
    model, tokenizer = distributed.load(args.model, group, dtype, args.gguf_bits)  # this rank's share of each layer
    with distributed.rank_zero_output(group):
        return command(args, model, tokenizer, distributed.shared_sampler(sampler, group))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
