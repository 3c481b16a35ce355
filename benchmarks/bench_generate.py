"""Prefill and decode speed, time to first token and peak memory: mlx_mistral vs mlx-lm (and
llama.cpp on a GGUF file).

The runtimes load the same checkpoint and run alternately in separate processes,
`--reps` times each; the table shows medians and the ratios mlx_mistral / each other runtime.
Prefill tok/s = prompt tokens / time to first token; decode tok/s = tokens after the
first / their time (greedy). On Linux both processes use OpenBLAS (preloaded by
mlx_mistral before mlx is imported) and float32, the CPU backend's fast dtype.

    python benchmarks/bench_generate.py --preset small [--quantize 4] [--reps 3] [--json]
    python benchmarks/bench_generate.py --preset small-moe [--quantize 4]   # Mixtral's experts
    python benchmarks/bench_generate.py --window 0 --prompts 1024,4096,16384 --kv-bits 8
        # the KV cache quantized in both runtimes (mlx-lm: from the first token)
    python benchmarks/bench_generate.py --model DIR     # any MLX/HF checkpoint directory
    python benchmarks/bench_generate.py --smollm2 q4_1 --prompts 128,1024
        # the real SmolLM2 GGUF as stored (ours, llama-cpp-python if installed, mlx-lm on the same
        # quantized triples); --smollm2 float32: its dequantized weights, ours and mlx-lm
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx, for both runtimes)
import mlx.core as mx  # noqa: E402

from presets import PRESETS  # noqa: E402

RUNTIMES = ("mlx_mistral", "mlx_lm", "llama_cpp")


def timed_generation(step_fn, n_decode: int) -> tuple[float, float, int]:
    """(ttft seconds, decode tok/s, peak bytes) of one generation from a token iterator factory."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = step_fn()
    next(tokens)
    first = time.perf_counter()
    for _ in range(n_decode - 1):
        next(tokens)
    end = time.perf_counter()
    tokens.close()
    return first - start, (n_decode - 1) / (end - first), mx.get_peak_memory()


def step_cost(prefill, forward, prompt: list[int], steps: int = 64) -> dict:
    """One decode step's cost after `prompt`: the ops of its graph (primitives in mx.export_to_dot of
    the unevaluated logits), the Python ms building it (the forward call) and the ms computing it
    (the eval of the greedy token); medians over `steps` steps. `prefill(ids)` fills a fresh cache
    and returns the last logits; `forward(token)` runs one token [1, 1] on it."""
    from graph_ops import ops as graph_ops

    y = mx.argmax(prefill(prompt)[:, -1], axis=-1)
    mx.eval(y)
    python, compute = [], []
    for i in range(steps):
        start = time.perf_counter()
        logits = forward(y.reshape(1, 1))
        built = time.perf_counter()
        if i == 0:
            ops = graph_ops(logits)
        y = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(y)
        python.append(built - start)
        compute.append(time.perf_counter() - built)
    return {"ops": ops, "python_ms": 1e3 * statistics.median(python), "compute_ms": 1e3 * statistics.median(compute)}


def worker(runtime: str, model_dir: str, prompt_lens: list[int], n_decode: int, dtype: str | None,
           kv_bits: int | None = None) -> dict:
    import numpy as np

    t = time.perf_counter()
    if runtime == "mlx_mistral":
        from mlx_mistral import load, make_sampler
        from mlx_mistral.generate import generate_step
        from mlx_mistral import make_cache

        model, _ = load(model_dir, dtype=getattr(mx, dtype) if dtype else None)
        greedy = make_sampler()

        def steps(prompt):
            cache = make_cache(model.args, len(prompt) + n_decode, dtype=model.dtype, kv_bits=kv_bits)
            return lambda: generate_step(model, prompt, cache, greedy)

        def stepper(prompt):
            cache = make_cache(model.args, len(prompt) + 80, dtype=model.dtype, kv_bits=kv_bits)
            return lambda ids: model(mx.array([ids]), cache), lambda token: model(token, cache)
    elif runtime == "llama_cpp":
        from llama_cpp import Llama

        threads = os.cpu_count()
        llm = Llama(model_path=model_dir, n_ctx=max(prompt_lens) + n_decode + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, verbose=False)

        def steps(prompt):
            return lambda: llm.generate(prompt, top_k=1, temp=0.0, reset=True)  # greedy, a fresh cache
    else:
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(model_dir))

        def steps(prompt):
            kv = dict(kv_bits=kv_bits, quantized_kv_start=0) if kv_bits else {}
            return lambda: (tok for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n_decode + 1, **kv))

        def stepper(prompt):
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(model)
            return lambda ids: model(mx.array([ids]), cache=cache), lambda token: model(token, cache=cache)
    load_s = time.perf_counter() - t
    weights = mx.get_active_memory()
    rng = np.random.default_rng(0)
    timed_generation(steps(rng.integers(100, 30000, 32).tolist()), 8)  # warm-up
    out = {"runtime": runtime, "load_s": load_s, "weights_bytes": weights, "runs": {}}
    for n in prompt_lens:
        ttft, decode, peak = timed_generation(steps(rng.integers(100, 30000, n).tolist()), n_decode)
        out["runs"][n] = {"ttft_s": ttft, "prefill_tps": n / ttft, "decode_tps": decode,
                          "peak_bytes": peak if runtime != "llama_cpp" else None}  # MLX's allocator only
        if runtime != "llama_cpp" and not kv_bits:
            prompt = rng.integers(100, 30000, n).tolist()
            out["runs"][n] |= step_cost(*stepper(prompt), prompt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--model", help="benchmark this checkpoint directory instead of a preset")
    p.add_argument("--smollm2", choices=("float32", "q4_1"), help="benchmark the installed SmolLM2 GGUF instead")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the preset with mlx-lm first")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="checkpoint/activation dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--window", type=int, default=4096, help="the preset's sliding window (0 = none)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the KV cache (group 64), both runtimes")
    p.add_argument("--prompts", default="128,1024,4096", help="prompt lengths")
    p.add_argument("--decode", type=int, default=128, help="tokens to generate")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    args = p.parse_args()
    prompt_lens = [int(x) for x in args.prompts.split(",")]
    dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else "float16")
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, prompt_lens, args.decode, dtype, args.kv_bits)))
        return

    from presets import make_checkpoint, smollm2_checkpoints

    if args.smollm2:
        paths = smollm2_checkpoints(args.smollm2)
        if not importlib.util.find_spec("llama_cpp"):
            paths.pop("llama_cpp", None)
            print("llama-cpp-python is not installed: no llama.cpp column", file=sys.stderr)
    else:
        model_dir = args.model or str(make_checkpoint(args.preset, dtype, args.quantize, args.window or None))
        paths = {"mlx_mistral": model_dir, "mlx_lm": model_dir}
    results = {r: [] for r in paths}
    for rep in range(args.reps):
        for runtime, model_dir in paths.items():
            cmd = [sys.executable, __file__, "--worker", runtime, "--model", model_dir, "--prompts",
                   args.prompts, "--decode", str(args.decode), "--dtype", dtype] + \
                (["--kv-bits", str(args.kv_bits)] if args.kv_bits else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[runtime].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"rep {rep + 1}/{args.reps} {runtime} done", file=sys.stderr)

    def med(runtime, n, key):
        values = [r["runs"][str(n)].get(key) for r in results[runtime]]
        return None if None in values else statistics.median(values) * (2**-20 if key == "peak_bytes" else 1)

    others = [r for r in paths if r != "mlx_mistral"]
    rows = []
    for n in prompt_lens:
        for key, label in (("prefill_tps", f"prefill tok/s @{n}"), ("ttft_s", f"ttft s @{n}"),
                           ("decode_tps", f"decode tok/s after {n}"), ("peak_bytes", f"peak MiB @{n}"),
                           ("ops", f"ops/token after {n}"), ("python_ms", f"python ms/token after {n}"),
                           ("compute_ms", f"compute ms/token after {n}")):
            row = {"metric": label} | {r: med(r, n, key) for r in paths}
            rows.append(row | {f"ratio vs {r}": row["mlx_mistral"] / row[r] if row[r] else None for r in others})
    setup = {"model": paths, "preset": None if args.model or args.smollm2 else args.preset, "quantize": args.quantize,
             "window": args.window, "kv_bits": args.kv_bits, "dtype": dtype, "device": str(mx.default_device()), "openblas": mlx_mistral._blas.ACTIVE,
             "reps": args.reps, "decode_tokens": args.decode}
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows, "raw": results}))
        return
    print(" ".join(f"{k}={v}" for k, v in setup.items()))
    columns = [k for k in rows[0] if k != "metric"]
    print(f"{'metric':<26}" + "".join(f"{c:>20}" for c in columns))
    for r in rows:
        print(f"{r['metric']:<26}" + "".join(f"{r[c]:>20.2f}" if r[c] is not None else f"{'-':>20}" for c in columns))


if __name__ == "__main__":
    main()
