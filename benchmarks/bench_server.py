"""Concurrent streaming clients against our server and mlx_lm.server: tok/s, time to first token, memory.

    python benchmarks/bench_server.py [--preset small] [--clients 1 4 8 16] [--prompt-tokens 128]
                                      [--answer-tokens 64] [--servers ours mlx_lm] [--pause] [--json]
    python benchmarks/bench_server.py --agent [--preset tiny] [--clients 8] [--turns 10]
                                      [--system-tokens 4096] [--answer-tokens 32]
    python benchmarks/bench_server.py --agent-replay [--preset tiny] [--turns 5] [--answer-tokens 8]
                                      [--reminder] [--servers ours mlx_lm] [--json]

Both servers are started by the script on 127.0.0.1 with the same float32 checkpoint (random
weights), greedy, /v1/completions streamed (no chat template: mlx-lm's needs one). For each
number of clients, all start at once (over one connection pool) with prompts of --prompt-tokens
tokens never sent before (mlx_lm.server keeps a prompt cache); the table shows aggregate
generated tok/s (the tokens each server's `usage` reports / wall time), those tokens and the wall
time (a greedy answer may end at EOS before --answer-tokens), TTFT p50 and p95, and the server's
peak resident memory (VmHWM). --pause also measures the longest gap between the tokens of 4
running streams while a 4096-token prompt is admitted, with and without interleaved prefill.
Our server runs with --max-kv-size (prompt + answer, rounded up) so rows do not allocate the
4096-token window.

--agent: the prefix cache's workload instead. Each client is an agent: one --system-tokens system
prompt shared by all, then its own --turns turns (a ~32-token user message, then the answer so
far, all sent back as text each turn), the clients all at once. It reports TTFT p50/p95,
aggregate tok/s and the share of prompt tokens the server reported cached, for our server with
its prefix cache off (--max-idle 0 --prompt-cache-mib 0), in memory (the defaults), and after a
restart from disk (--prompt-cache-dir: a first run sends the system prompt once and stops), and
for mlx_lm.server (its prompt cache, default settings).

--agent-replay: a Claude Code session replayed, one request after the other. Turn 1 is Claude Code
2.1.197's recorded first request (tests/data/agent_requests/claude_code.json: system blocks, a user
and a system-role message, 24 tools, thinking, context_management; ~19k tokens); each later turn
appends a fixed assistant turn (a line of text and a Read tool_use of a fixed file) and a user turn
of its tool_result (a fixed ~200-token listing, different each turn), as Claude Code sends them
(cache_control moved to the last block), and sends the whole conversation again; --reminder also
puts a <system-reminder> text block beside each tool_result (user text: V3-V11 templates then move
[AVAILABLE_TOOLS] before it, each turn). The assistant turns are written here, not generated, so
every server gets the same prompts; generation is capped at --answer-tokens (default 8: the
prefill is measured). Servers: ours (POST /v1/messages, streamed) on the --preset's weights
(full attention, Tekken's 131072-token vocabulary, --max-kv-size 32768) with a Tekken v7 and
with a v13 tokenizer, and mlx_lm.server (POST /v1/chat/completions, streamed: the same
conversation as OpenAI chat messages and tools, text blocks joined as mistral-common joins them)
on the v7 one. Per turn: TTFT (the request's start to the first streamed event that carries a
token: our message_start, mlx_lm's first chunk), the prompt tokens and the cached ones each
server reports (ours: message_start's cache_read_input_tokens; mlx_lm:
usage.prompt_tokens_details.cached_tokens), then the target: from turn 2, v13's TTFT under 10% of
turn 1's.
"""

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from mlx_mistral.demo import TOKENIZER_V1  # noqa: E402
from mlx_mistral.tokenizer import Tokenizer  # noqa: E402
from agent_replay import agent_replay, print_replay  # noqa: E402
from presets import PRESETS, make_checkpoint  # noqa: E402
from servers import CLIENT, Server  # noqa: E402

TOKENIZER = Tokenizer(TOKENIZER_V1)  # the presets' tokenizer
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
def prompt(i: int, tokens: int) -> str:
    """About `tokens` tokens of text (BOS included), different for each i."""
    text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(i) for j in range(tokens))
    return TOKENIZER.decode(TOKENIZER.encode(text)[: tokens - 1])


def stream(url: str, model: str, text: str, max_tokens: int, out: dict) -> None:
    """One streaming request: times of each text chunk after the start, the text, and the
    generated, prompt and cached tokens the server's usage reports (a chunk may carry several
    tokens, or none), in out."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, pieces, usage = time.perf_counter(), [], [], {}
    with CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                if (chunk.get("choices") or [{}])[0].get("text"):
                    times.append(time.perf_counter() - start)
                    pieces.append(chunk["choices"][0]["text"])
                usage = chunk.get("usage") or usage
    out.update(start=start, times=times, text="".join(pieces), tokens=usage.get("completion_tokens", len(times)),
               prompt_tokens=usage.get("prompt_tokens", 0),
               cached=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def run_clients(server: Server, model: str, n: int, prompt_tokens: int, answer_tokens: int,
                prompts: Iterator[int]) -> dict:
    """n streams at once, each with the next prompt of `prompts`: never one a server has seen
    (mlx_lm.server keeps a prompt cache; repeated prompts would skip their prefill)."""
    outs = [{} for _ in range(n)]
    texts = [prompt(next(prompts), prompt_tokens) for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(server.url, model, texts[i], answer_tokens, outs[i]))
               for i in range(n)]
    return dict(clients=n, **timed(threads, outs))


def timed(threads: list[threading.Thread], outs: list[dict]) -> dict:
    """Run `threads` at once, which fill `outs` (stream's): tok/s, tokens, wall time, TTFT p50 and p95."""
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(o["times"][0] for o in outs if o.get("times"))
    tokens = sum(o.get("tokens", 0) for o in outs)
    return dict(tok_s=tokens / wall, tokens=tokens, wall_s=wall, ttft_p50=statistics.median(ttft),
                ttft_p95=ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))])


def longest_pause(server: Server, model: str, answer_tokens: int) -> float:
    """Longest gap between tokens of 4 running streams while a 4096-token prompt is admitted."""
    outs = [{} for _ in range(4)]
    threads = [threading.Thread(target=stream, args=(server.url, model, prompt(i, 16), answer_tokens, outs[i]))
               for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    long = threading.Thread(target=stream, args=(server.url, model, prompt(99, 4096), 1, {}))
    long.start()
    for t in threads + [long]:
        t.join()
    gaps = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:])]
    if len(gaps) < 4 * 10:
        raise RuntimeError("the running streams did not stream")
    return max(gaps)


def agent(url: str, model: str, system: str, client: int, args: argparse.Namespace, outs: list) -> None:
    """One agent's turns, one after the other: the system prompt, its turns so far, a new one."""
    history = system
    for turn in range(args.turns):
        history += f"\nUser: {prompt(1000 + 100 * client + turn, 32)}\nAssistant:"
        out: dict = {}
        stream(url, model, history, args.answer_tokens, out)
        outs.append(out)
        history += out["text"]


def run_agents(server: Server, model: str, args: argparse.Namespace) -> dict:
    """--clients agents at once; TTFT over all their turns, tok/s over the whole run."""
    system, outs = prompt(999, args.system_tokens), []
    threads = [threading.Thread(target=agent, args=(server.url, model, system, c, args, outs))
               for c in range(args.clients[0])]
    result = timed(threads, outs)
    return dict(requests=len(outs), **result,
                cached=sum(o["cached"] for o in outs) / max(1, sum(o["prompt_tokens"] for o in outs)))


def agent_modes(model: str, args: argparse.Namespace) -> dict:
    """The agent workload on each server setting, one server at a time (see the docstring)."""
    results, directory = {}, tempfile.mkdtemp(prefix="mlx-mistral-prompt-cache-")
    modes = [("off", "ours", ["--max-idle", "0", "--prompt-cache-mib", "0"]), ("memory", "ours", []),
             ("disk", "ours", ["--prompt-cache-dir", directory]), ("mlx_lm", "mlx_lm", [])]
    try:
        for mode, kind, extra in modes:
            if kind not in args.servers:
                continue
            if mode == "disk":  # a first server leaves the system prompt's blocks on disk
                server = Server(kind, model, extra)
                stream(server.url, model, prompt(999, args.system_tokens), 1, {})
                server.stop()
            server = Server(kind, model, extra)
            try:
                run_clients(server, model, 1, 16, 4, itertools.count(10**6))  # warm-up
                results[mode] = run_agents(server, model, args)
                print(mode, results[mode], file=sys.stderr, flush=True)
            finally:
                server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results


def print_agents(results: dict, args: argparse.Namespace) -> None:
    print(f"{args.preset} float32, greedy, {args.clients[0]} agents x {args.turns} turns, {args.system_tokens}-token "
          f"shared system prompt, {args.answer_tokens}-token answers")
    print(f"{'server':16} {'TTFT p50':>9} {'TTFT p95':>9} {'tok/s':>7} {'tokens':>7} {'wall':>8} {'cached':>7}")
    names = {"off": "ours, cache off", "memory": "ours, memory", "disk": "ours, from disk", "mlx_lm": "mlx_lm.server"}
    for mode, r in results.items():
        print(f"{names[mode]:16} {r['ttft_p50']:8.2f}s {r['ttft_p95']:8.2f}s {r['tok_s']:7.1f} {r['tokens']:7d} "
              f"{r['wall_s']:7.1f}s {r['cached']:7.0%}")


def plot(results: dict, args: argparse.Namespace, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in args.servers:
        rows = results[kind]["rows"]
        name = {"ours": "mlx_mistral.server", "mlx_lm": "mlx_lm.server"}[kind]
        left.plot([r["clients"] for r in rows], [r["tok_s"] for r in rows], "o-", label=name)
        right.plot([r["clients"] for r in rows], [r["ttft_p95"] for r in rows], "o-", label=name)
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate generated tok/s")
    right.set(xlabel="concurrent streaming clients", ylabel="time to first token, p95 (s)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.preset} float32, greedy, {args.prompt_tokens}-token prompts, "
                 f"{args.answer_tokens}-token answers")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", action="store_true", help="the agent workload (see above) instead")
    p.add_argument("--agent-replay", action="store_true", help="the Claude Code session replay (see above) instead")
    p.add_argument("--preset", choices=PRESETS, help="default: small (--agent, --agent-replay: tiny)")
    p.add_argument("--clients", type=int, nargs="+", help="default: 1 4 8 16 (--agent: 8)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--answer-tokens", type=int, help="default: 64 (--agent: 32, --agent-replay: 8)")
    p.add_argument("--turns", type=int, help="--agent: turns per agent (default 10); --agent-replay: turns (5)")
    p.add_argument("--reminder", action="store_true", help="--agent-replay: a system-reminder beside each tool_result")
    p.add_argument("--system-tokens", type=int, default=4096, help="--agent: the shared system prompt")
    p.add_argument("--servers", nargs="+", choices=["ours", "mlx_lm"], default=["ours", "mlx_lm"])
    p.add_argument("--pause", action="store_true", help="also measure the pause of running streams (ours)")
    p.add_argument("--png", help="also plot tok/s and TTFT p95 vs clients to this file (e.g. docs/server.png)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.preset = args.preset or ("tiny" if args.agent or args.agent_replay else "small")
    args.clients = args.clients or ([8] if args.agent else [1, 4, 8, 16])
    args.answer_tokens = args.answer_tokens or (32 if args.agent else 8 if args.agent_replay else 64)
    args.turns = args.turns or (5 if args.agent_replay else 10)
    if args.agent_replay:
        results = agent_replay(args)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_replay(results, args)
        return 0
    checkpoint = make_checkpoint(args.preset)
    model, results = str(checkpoint), {}
    if args.agent:
        try:
            results = agent_modes(model, args)
        finally:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_agents(results, args)
        return 0
    kv = str(-(-(args.prompt_tokens + args.answer_tokens + 64) // 64) * 64)
    try:
        for kind in args.servers:
            server = Server(kind, model, ["--max-kv-size", kv] if kind == "ours" else [])
            try:
                prompts = itertools.count()  # the same prompts for each server, in the same order
                run_clients(server, model, 1, 16, 4, prompts)  # warm-up
                rows = []
                for n in args.clients:
                    rows.append(run_clients(server, model, n, args.prompt_tokens, args.answer_tokens, prompts))
                    print(kind, rows[-1], file=sys.stderr, flush=True)  # as they come: a long run is not lost
                results[kind] = dict(rows=rows, peak_rss=server.peak_rss())
            finally:
                server.stop()
        if args.pause:
            for name, chunk in (("interleaved", "512"), ("whole", "8192")):
                server = Server("ours", model, ["--prefill-chunk", chunk, "--max-kv-size", "4608"])
                try:
                    results[f"pause_{name}_s"] = longest_pause(server, model, 48)
                    print(name, results[f"pause_{name}_s"], file=sys.stderr, flush=True)
                finally:
                    server.stop()
    finally:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    if args.png:
        plot(results, args, Path(args.png))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.preset} float32, greedy, {args.prompt_tokens}-token prompts, {args.answer_tokens}-token answers")
    print(f"{'server':8} {'clients':>7} {'tok/s':>8} {'tokens':>7} {'wall':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'peak RSS':>9}")
    for kind in args.servers:
        for r in results[kind]["rows"]:
            print(f"{kind:8} {r['clients']:7d} {r['tok_s']:8.1f} {r['tokens']:7d} {r['wall_s']:6.2f}s "
                  f"{r['ttft_p50']:8.2f}s {r['ttft_p95']:8.2f}s "
                  f"{results[kind]['peak_rss'] / 2**20:7.0f}MiB")
    for name in ("interleaved", "whole"):
        if f"pause_{name}_s" in results:
            print(f"longest pause of 4 running streams while a 4096-token prompt is admitted "
                  f"({name} prefill): {results[f'pause_{name}_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
