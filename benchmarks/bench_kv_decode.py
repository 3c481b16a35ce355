"""Decode tok/s at long contexts with the float vs the 8/4-bit KV cache, without the prefill.

A decode step's cost does not depend on what the slots hold, so each cache is made at
the context length and its offset set there (slots stay zero): 16k tokens of context
are measured in seconds, where prefilling them on a CPU takes minutes. Windowless
`small` preset by default; median of --steps timed steps after 2 warm-up steps.

    python benchmarks/bench_kv_decode.py [--preset small] [--contexts 1024,4096,16384] [--kv-bits 8,4]
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402


def main() -> None:
    from presets import kv_bench_parser, load_windowless

    from mlx_mistral import make_cache

    p = kv_bench_parser(__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    model, dtype = load_windowless(a)
    results = []
    for n in [int(x) for x in a.contexts.split(",")]:
        for bits in [None] + [int(b) for b in a.kv_bits.split(",") if b]:
            cache = make_cache(model.args, n + a.steps + 2, dtype=model.dtype, kv_bits=bits,
                               kv_group_size=a.kv_group_size)
            cache.offsets = [n]
            y, times = mx.array([[7]]), []
            for step in range(a.steps + 2):
                start = time.perf_counter()
                y = mx.argmax(model(y, cache)[:, -1:], axis=-1)
                mx.eval(y)
                times.append(time.perf_counter() - start)
            results.append({"context": n, "kv_bits": bits, "decode_tps": 1 / statistics.median(times[2:]),
                            "kv_bytes": cache.nbytes})
            del cache
    if a.json:
        print(json.dumps(results))
        return
    print(f"{a.model or a.preset} (windowless), {dtype}, median of {a.steps} steps")
    for r in results:
        base = next(x for x in results if x["context"] == r["context"] and x["kv_bits"] is None)
        print(f"context {r['context']:>6}  {str(r['kv_bits'] or 'float') + ' K/V':>9}: "
              f"{r['decode_tps']:7.1f} tok/s ({r['decode_tps'] / base['decode_tps']:.2f}x float), "
              f"KV {r['kv_bytes'] / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
