"""Aggregate decode throughput of batched generation, and what GQA's small cache buys.

Decodes batches of 1, 2, 4, 8, 16 ragged prompts (lengths 32-160) on one model and
reports aggregate decode tok/s (tokens of all rows / decode time), the speed-up over
batch 1, peak memory and KV bytes. Then the largest batch that fits a memory budget
with a GQA cache vs a hypothetical multi-head (MHA) cache, from mlx_mistral.memory.

    python benchmarks/bench_batch.py [--preset small] [--batches 1,2,4,8,16] [--tokens 32] [--reps 3] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_mistral.memory import MISTRAL_7B, report  # noqa: E402
from presets import PRESETS  # noqa: E402


def run_batch(model, tokenizer, prompts, tokens: int) -> dict:
    first = last = None
    for _, r in mlx_mistral.batch_stream_generate(model, tokenizer, prompts, max_tokens=tokens):
        now = time.perf_counter()
        first, last = first or now, now
        peak, kv = r.peak_memory, r.kv_cache_bytes if first == now else kv
    # The first step's tokens come with the prefill; decode time covers the other steps.
    decoded = len(prompts) * (tokens - 1)
    return {"batch": len(prompts), "decode_tps": decoded / (last - first), "peak_bytes": peak, "kv_bytes": kv}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--model", help="a checkpoint directory instead of a preset")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--reps", type=int, default=3, help="repetitions; decode tok/s is their median")
    p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for the GQA vs MHA table")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from presets import make_checkpoint

    dtype = "float32" if mx.default_device() == mx.cpu else "float16"
    model_dir = a.model or str(make_checkpoint(a.preset, dtype))
    model, tokenizer = mlx_mistral.load(model_dir)
    rng = np.random.default_rng(0)
    batches = [int(b) for b in a.batches.split(",")]
    prompts = [rng.integers(100, 30000, int(n)).tolist() for n in rng.integers(32, 161, max(batches))]
    run_batch(model, tokenizer, prompts[:2], 4)  # warm-up
    # Batch sizes alternate within each repetition, so machine noise hits them alike.
    runs = [[run_batch(model, tokenizer, prompts[:b], a.tokens) for b in batches] for _ in range(a.reps)]
    rows = [dict(by_batch[0], decode_tps=float(np.median([r["decode_tps"] for r in by_batch])))
            for by_batch in zip(*runs)]
    base = rows[0]["decode_tps"]
    memory = report(MISTRAL_7B, [4096, 32768], [1], a.budget_gb)["max_batch"]
    if a.json:
        print(json.dumps({"model": model_dir, "dtype": dtype, "rows": rows, "max_batch_7b": memory}))
        return
    print(f"model={model_dir} dtype={dtype} device={mx.default_device()} tokens/row={a.tokens} "
          f"reps={a.reps} (median)")
    print(f"{'batch':>6} {'decode tok/s':>13} {'x batch 1':>10} {'peak MiB':>9} {'KV MiB':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['decode_tps']:>13.1f} {r['decode_tps'] / base:>10.2f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['kv_bytes'] / 2**20:>8.2f}")
    print(f"\nMistral 7B, 32768-token sequences, largest batch in {a.budget_gb:g} GB (weights + KV cache):")
    for weights, m in memory.items():
        print(f"  weights {weights:>5}: MHA {m['mha']:>3}   GQA {m['gqa']:>3}   GQA + rolling buffer {m['gqa_rolling']:>3}")


if __name__ == "__main__":
    main()
