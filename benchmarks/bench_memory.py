"""Memory over a long generation: mlx_mistral's rolling cache vs mlx-lm's default cache.

Generates far past the window (default: `small` with window 256, 8x the window) and
records, every --every tokens, the peak memory (since the start) and the KV bytes
allocated, for each runtime in its own process. Prints the table, checks that our
peak is flat after the window fills, and plots memory vs tokens to a PNG.

    python benchmarks/bench_memory.py [--preset small] [--window 256] [--tokens 2048] [--png out.png]
    python benchmarks/bench_memory.py --window 0 --tokens 4096 --kv-bits 8,4
        # windowless, the KV cache also at 8 and 4 bits in both runtimes (mlx-lm's --kv-bits,
        # quantizing from the first token); our KV bytes are checked against memory.py's formula
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

RUNTIMES = ("mlx_mistral", "mlx_lm")


def worker(runtime: str, model_dir: str, tokens: int, every: int, kv_bits: int | None = None) -> list[dict]:
    prompt = list(range(100, 164))
    if runtime == "mlx_mistral":
        from mlx_mistral import load, make_cache, make_sampler
        from mlx_mistral.generate import generate_step

        model, _ = load(model_dir)
        # the full window; windowless: the slots this generation needs
        cache = make_cache(model.args, len(prompt) + tokens + 1, dtype=model.dtype, kv_bits=kv_bits)
        steps = generate_step(model, prompt, cache, make_sampler())

        def kv_bytes():
            return cache.nbytes
    else:
        from mlx_lm import load
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = load(model_dir)
        cache = make_prompt_cache(model)  # mlx-lm's default
        kv = dict(kv_bits=kv_bits, quantized_kv_start=0) if kv_bits else {}
        steps = (t for t, _ in generate_step(mx.array(prompt), model, max_tokens=tokens + 1, prompt_cache=cache,
                                             **kv))

        def kv_bytes():
            return sum(c.nbytes for c in cache)
    mx.reset_peak_memory()
    rows = []
    for n in range(1, tokens + 1):
        next(steps)
        if n % every == 0:
            rows.append({"tokens": len(prompt) + n, "peak_bytes": mx.get_peak_memory(),
                         "active_bytes": mx.get_active_memory(), "kv_bytes": kv_bytes()})
    return rows


def plot(results: dict, window: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for runtime, rows in results.items():
        x = [r["tokens"] for r in rows]
        ax.plot(x, [r["peak_bytes"] / 2**20 for r in rows], label=f"{runtime} peak")
        ax.plot(x, [r["kv_bytes"] / 2**20 for r in rows], "--", label=f"{runtime} KV cache")
    if window:
        ax.axvline(window, color="grey", lw=0.8, ls=":", label=f"window ({window})")
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("MiB")
    ax.set_title("Memory over a long generation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def print_kv_bits(results: dict, kv_bits: list[int], model_dir: str, a: argparse.Namespace) -> None:
    """The last row of each run, float vs quantized K/V; our KV bytes vs memory.py's formula."""
    from mlx_mistral.loading import read_config
    from mlx_mistral.memory import kv_bytes_per_token

    args = read_config(Path(model_dir))
    if a.json:
        print(json.dumps({"results": results}))
    else:
        print(f"{'run':<26} {'tokens':>7} {'peak MiB':>10} {'KV MiB':>9} {'KV formula MiB':>15}")
        for name, rows in results.items():
            last, bits = rows[-1], next((b for b in kv_bits if name.endswith(f" {b}-bit KV")), None)
            formula = ""
            if name.startswith("mlx_mistral"):  # the cache holds prompt + tokens + 1 slots
                slots = min(64 + a.tokens + 1, args.sliding_window or 1 << 62)
                dtype_bytes = 4 if mx.default_device() == mx.cpu else 2
                f = slots * kv_bytes_per_token(args, dtype_bytes, bits=bits)
                formula = f"{f / 2**20:.2f} {'OK' if f == last['kv_bytes'] else 'MISMATCH'}"
            print(f"{name:<26} {last['tokens']:>7} {last['peak_bytes'] / 2**20:>10.1f} "
                  f"{last['kv_bytes'] / 2**20:>9.2f} {formula:>15}")
    if a.png:
        Path(a.png).parent.mkdir(parents=True, exist_ok=True)
        plot(results, a.window, Path(a.png))
        print(f"plot: {a.png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "small", "7b"), default="small")
    p.add_argument("--quantize", type=int, choices=(4, 8))
    p.add_argument("--window", type=int, default=256, help="0 = windowless")
    p.add_argument("--kv-bits", default="", help="also quantized K/V at these bits, e.g. 8,4")
    p.add_argument("--tokens", type=int, help="tokens to generate (default 8x the window)")
    p.add_argument("--every", type=int, default=64)
    p.add_argument("--png", default="docs/memory.png", help="the plot ('' for none; needs matplotlib)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    p.add_argument("--model", help="use this checkpoint directory instead of writing the preset")
    a = p.parse_args()
    tokens = a.tokens or 8 * a.window
    kv_bits = [int(b) for b in a.kv_bits.split(",") if b]
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, tokens, a.every, kv_bits[0] if kv_bits else None)), flush=True)
        os._exit(0)  # skip exit handlers: OpenBLAS's shutdown sometimes hangs a process at exit (seen here)
    if not tokens:
        p.error("--tokens is needed with --window 0")

    from presets import make_checkpoint

    dtype = "float32" if mx.default_device() == mx.cpu else "float16"
    model_dir = a.model or str(make_checkpoint(a.preset, dtype, a.quantize, sliding_window=a.window or None))
    results = {}
    for bits in [None] + kv_bits:
        for runtime in RUNTIMES:
            cmd = [sys.executable, __file__, "--worker", runtime, "--model", model_dir, "--tokens", str(tokens),
                   "--every", str(a.every), "--window", str(a.window), "--kv-bits", str(bits or "")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[runtime + (f" {bits}-bit KV" if bits else "")] = json.loads(out.strip().splitlines()[-1])
    if kv_bits:
        print_kv_bits(results, kv_bits, model_dir, a)
        return

    def at(runtime, n):  # the first row at or past n tokens
        return next(r for r in results[runtime] if r["tokens"] >= n)

    ours_2w, ours_end = at("mlx_mistral", 2 * a.window), results["mlx_mistral"][-1]
    growth = ours_end["peak_bytes"] / ours_2w["peak_bytes"] - 1
    summary = {"preset": a.preset, "quantize": a.quantize, "window": a.window, "tokens": tokens,
               "dtype": dtype, "peak_growth_2w_to_end": growth,
               "peak_ratio_vs_mlx_lm": ours_end["peak_bytes"] / results["mlx_lm"][-1]["peak_bytes"]}
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    plot(results, a.window, Path(a.png))
    if a.json:
        print(json.dumps({"summary": summary, "results": results}))
        return
    print(" ".join(f"{k}={v}" for k, v in summary.items() if k not in ("peak_growth_2w_to_end",
                                                                          "peak_ratio_vs_mlx_lm")))
    print(f"{'tokens':>7} | {'mlx_mistral peak':>16} {'KV':>9} | {'mlx-lm peak':>12} {'KV':>9}   (MiB)")
    for ours, theirs in zip(results["mlx_mistral"], results["mlx_lm"]):
        print(f"{ours['tokens']:>7} | {ours['peak_bytes'] / 2**20:>16.1f} {ours['kv_bytes'] / 2**20:>9.1f} | "
              f"{theirs['peak_bytes'] / 2**20:>12.1f} {theirs['kv_bytes'] / 2**20:>9.1f}")
    print(f"mlx_mistral peak growth from 2x the window to {tokens / a.window:.0f}x: {growth * 100:.2f}%")
    print(f"mlx_mistral peak / mlx-lm peak at the end: {summary['peak_ratio_vs_mlx_lm']:.3f}")
    print(f"plot: {a.png}")


if __name__ == "__main__":
    main()
