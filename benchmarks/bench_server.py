"""Concurrent streaming clients against our server and mlx_lm.server: tok/s, time to first token, memory.

    python benchmarks/bench_server.py [--preset small] [--clients 1 4 8 16] [--prompt-tokens 128]
                                      [--answer-tokens 64] [--servers ours mlx_lm] [--pause] [--json]

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
"""

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from mlx_mistral.demo import TOKENIZER_V1  # noqa: E402
from mlx_mistral.tokenizer import Tokenizer  # noqa: E402
from presets import PRESETS, make_checkpoint  # noqa: E402

TOKENIZER = Tokenizer(TOKENIZER_V1)  # the presets' tokenizer
# mlx_lm.server with the OpenBLAS that our server preloads on Linux (mlx_mistral._blas), as in the other
# benchmarks: without it MLX's Linux CPU wheel multiplies ~40x slower, and the comparison would say nothing.
MLX_LM_SERVER = "import mlx_mistral, sys; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
# One connection pool for every stream, as one app or agent talking to a server has: a new client per
# request would spend tens of ms of the benchmark's own CPU on each (SSL context, connection).
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, model: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = {"ours": [sys.executable, "-m", "mlx_mistral.server", "--max-batch", "16"],
               "mlx_lm": [sys.executable, "-c", MLX_LM_SERVER]}[kind]
        self.proc = subprocess.Popen(cmd + ["--model", model, "--port", str(self.port), *extra], cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{kind} server did not start")

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024

    def stop(self) -> None:
        """Ctrl-C (both servers stop on it), then kill if it lingers."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def prompt(i: int, tokens: int) -> str:
    """About `tokens` tokens of text (BOS included), different for each i."""
    text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(i) for j in range(tokens))
    return TOKENIZER.decode(TOKENIZER.encode(text)[: tokens - 1])


def stream(url: str, model: str, text: str, max_tokens: int, out: dict) -> None:
    """One streaming request: times of each text chunk after the start, and the generated
    tokens the server's usage reports (a chunk may carry several tokens, or none), in out."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], None
    with CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                if (chunk.get("choices") or [{}])[0].get("text"):
                    times.append(time.perf_counter() - start)
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    out.update(start=start, times=times, tokens=len(times) if tokens is None else tokens)


def run_clients(server: Server, model: str, n: int, prompt_tokens: int, answer_tokens: int,
                prompts: Iterator[int]) -> dict:
    """n streams at once, each with the next prompt of `prompts`: never one a server has seen
    (mlx_lm.server keeps a prompt cache; repeated prompts would skip their prefill)."""
    outs = [{} for _ in range(n)]
    texts = [prompt(next(prompts), prompt_tokens) for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(server.url, model, texts[i], answer_tokens, outs[i]))
               for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(o["times"][0] for o in outs if o.get("times"))
    tokens = sum(o.get("tokens", 0) for o in outs)
    return dict(clients=n, tok_s=tokens / wall, tokens=tokens, wall_s=wall, ttft_p50=statistics.median(ttft),
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
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--servers", nargs="+", choices=["ours", "mlx_lm"], default=["ours", "mlx_lm"])
    p.add_argument("--pause", action="store_true", help="also measure the pause of running streams (ours)")
    p.add_argument("--png", help="also plot tok/s and TTFT p95 vs clients to this file (e.g. docs/server.png)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    checkpoint = make_checkpoint(args.preset)
    model, results = str(checkpoint), {}
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
