"""Decode tok/s and peak memory at long contexts with the float vs the 8/4-bit KV cache,
without the prefill; with --vs-mlx-lm, mlx-lm's own caches (its --kv-bits) side by side.

A decode step's cost does not depend on what the slots hold, so each cache is made at
the context length and its offset set there (slots stay zero): 16k tokens of context
are measured in seconds, where prefilling them on a CPU takes minutes. mlx-lm's caches
are filled by one update_and_fetch of n zero tokens (then they hold what its prefill
leaves: n tokens in steps of 256 slots). Windowless `small` preset by default.

Speed: the caches of one context run interleaved, --steps timed steps each in rounds of
4 (the machine may be shared), after 2 warm-up steps; the median. Peak memory: the
model's weights plus the most the cache and the warm-up steps (of that cache alone) held
beyond what was in use before that cache was made. Our KV bytes are checked against
memory.py's formula.

    python benchmarks/bench_kv_decode.py [--preset small] [--contexts 1024,4096,16384] [--kv-bits 8,4] \
        [--vs-mlx-lm]
    python benchmarks/bench_kv_decode.py --ops     # instead: one layer's attention op by op
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def our_cache(model, n: int, slots: int, bits: int | None, group: int):
    from mlx_mistral import make_cache

    cache = make_cache(model.args, slots, dtype=model.dtype, kv_bits=bits, kv_group_size=group)
    cache.offsets = [n]
    return cache, cache.nbytes


def mlx_lm_cache(model, n: int, slots: int, bits: int | None, group: int):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    layer = model.layers[0].self_attn
    zeros = mx.zeros((1, layer.n_kv_heads, n, layer.k_proj.weight.shape[0] // layer.n_kv_heads),
                     layer.k_proj.weight.dtype)
    cache = [QuantizedKVCache(group, bits) if bits else KVCache() for _ in model.layers]
    for c in cache:
        c.update_and_fetch(zeros, zeros)
    mx.eval([c.state for c in cache])
    return cache, sum(c.nbytes for c in cache)


def step(model, runtime: str, y: mx.array, cache) -> mx.array:
    logits = model(y, cache) if runtime == "mlx_mistral" else model(y, cache=cache)
    y = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(y)
    return y


def attention_ops(model, n: int, bits: int, group: int, reps: int) -> dict[str, float]:
    """Median ms of one layer's decode attention at context n (random K/V, folded query
    heads), the op sets interleaved: the float fused attention; quantized_attention on one
    stream and on the CPU path's streams (head_streams); and its parts on one stream."""
    from mlx_mistral.model import quantized_attention

    a, (n_kv, head_dim) = model.args, (model.args.n_kv_heads, model.args.head_dim)
    q = mx.random.normal((1, n_kv, a.n_heads // n_kv, head_dim))
    kf, vf = mx.random.normal((2, 1, n_kv, n, head_dim))
    k, v = (tuple(mx.quantize(x, group_size=group, bits=bits)) for x in (kf, vf))
    head = lambda kv, h: [x[:, h:h + 1] for x in kv]  # noqa: E731
    qmm = lambda x, w, t: mx.quantized_matmul(x, *w, transpose=t, group_size=group, bits=bits)  # noqa: E731
    scores = [qmm(q[:, h:h + 1], head(k, h), True) for h in range(n_kv)]
    probs = [mx.softmax(s, axis=-1) for s in scores]
    mx.eval(kf, vf, k, v, probs)
    streams = model.model.layers[0].self_attn.head_streams
    q_heads = q.reshape(1, a.n_heads, 1, -1)  # quantized_attention folds them back
    ops = {"float fused attention": lambda: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=1.0),
           "quantized, 1 stream": lambda: quantized_attention(q_heads, k, v, None, group, bits),
           "  scores q K^T": lambda: [qmm(q[:, h:h + 1], head(k, h), True) for h in range(n_kv)],
           "  softmax": lambda: [mx.softmax(s, axis=-1) for s in scores],
           "  probs V": lambda: [qmm(p, head(v, h), False) for h, p in enumerate(probs)]}
    if streams:
        split = lambda: quantized_attention(q_heads, k, v, None, group, bits, streams())  # noqa: E731
        ops[f"quantized, {len(streams())} streams"] = split
    times = {name: [] for name in ops}
    for _ in range(reps):
        for name, f in ops.items():
            start = time.perf_counter()
            mx.eval(f())
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure(models: dict, n: int, runs: list, steps: int, group: int) -> list[dict]:
    """Decode tok/s, KV bytes and peak memory of each (runtime, kv_bits) of `runs` at context n."""
    caches, rows = {}, {}
    for runtime, bits in runs:
        model, make = models[runtime]
        mx.synchronize()
        before = mx.get_active_memory()
        cache, kv_bytes = make(model, n, n + steps + 2, bits, group)
        mx.reset_peak_memory()
        y = step(model, runtime, step(model, runtime, mx.array([[7]]), cache), cache)  # warm-up
        caches[runtime, bits] = (cache, y)
        weights = sum(x.nbytes for _, x in tree_flatten(model.parameters()))
        rows[runtime, bits] = {"runtime": runtime, "context": n, "kv_bits": bits, "kv_bytes": kv_bytes,
                               "slots": n + steps + 2, "peak_bytes": weights + mx.get_peak_memory() - before}
    times = {key: [] for key in caches}
    for _ in range(steps // 4):  # rounds of 4 steps of every cache in turn
        for key, (cache, y) in caches.items():
            for _ in range(4):
                start = time.perf_counter()
                y = step(models[key[0]][0], key[0], y, cache)
                times[key].append(time.perf_counter() - start)
            caches[key] = (cache, y)
    return [dict(r, decode_tps=1 / statistics.median(times[key])) for key, r in rows.items()]


def print_table(results: list[dict], model, group: int) -> None:
    from mlx_mistral.memory import kv_bytes_per_token

    print(f"{'context':>7} {'runtime':<12} {'K/V':>6} {'tok/s':>7} {'x float':>8} {'KV MiB':>8} "
          f"{'peak MiB':>9}  note")
    for r in results:
        same = [x for x in results if x["context"] == r["context"]]
        base = next(x for x in same if x["kv_bits"] is None and x["runtime"] == r["runtime"])
        note = ""
        if r["runtime"] == "mlx_mistral":
            per_token = kv_bytes_per_token(model.args, model.dtype.size, bits=r["kv_bits"], group=group)
            formula = r["slots"] * per_token
            note = "KV = formula" if r["kv_bytes"] == formula else f"KV != formula ({formula} B)"
            rival = next((x for x in same if x["kv_bits"] == r["kv_bits"] and x["runtime"] == "mlx_lm"), None)
            if rival:
                note += f", peak {r['peak_bytes'] / rival['peak_bytes']:.3f}x mlx-lm's"
        kv = str(r["kv_bits"] or "float")
        print(f"{r['context']:>7} {r['runtime']:<12} {kv:>6} {r['decode_tps']:7.2f} "
              f"{r['decode_tps'] / base['decode_tps']:8.2f} {r['kv_bytes'] / 2**20:8.1f} "
              f"{r['peak_bytes'] / 2**20:9.1f}  {note}")


def main() -> None:
    from presets import kv_bench_parser, load_windowless

    p = kv_bench_parser(__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per cache (rounds of 4)")
    p.add_argument("--vs-mlx-lm", action="store_true", help="also mlx-lm's KVCache / QuantizedKVCache")
    p.add_argument("--ops", action="store_true", help="instead: one layer's attention op by op (ms)")
    a = p.parse_args()
    ours, dtype, model_dir = load_windowless(a)
    contexts = [int(x) for x in a.contexts.split(",")]
    bits = [int(b) for b in a.kv_bits.split(",") if b]
    if a.ops:
        ops = {f"{n} {b}-bit": attention_ops(ours, n, b, a.kv_group_size, 2 * a.steps)
               for n in contexts for b in bits}
        if a.json:
            print(json.dumps(ops))
            return
        print(f"one layer's decode attention, ms (median of {2 * a.steps}); columns: context, K/V bits")
        print(f"{'':<24}" + "".join(f"{key:>13}" for key in ops))
        for op in next(iter(ops.values())):
            print(f"{op:<24}" + "".join(f"{r[op]:>13.2f}" for r in ops.values()))
        return
    models = {"mlx_mistral": (ours, our_cache)}
    if a.vs_mlx_lm:
        import mlx_lm

        models["mlx_lm"] = (mlx_lm.load(model_dir)[0], mlx_lm_cache)
    steps = 4 * -(-a.steps // 4)
    runs = [(m, b) for m in models for b in [None] + bits]
    results = [r for n in contexts for r in measure(models, n, runs, steps, a.kv_group_size)]
    if a.json:
        print(json.dumps(results))
        return
    print(f"{a.model or a.preset} (windowless), {dtype}, median of {steps} steps")
    print_table(results, ours, a.kv_group_size)


if __name__ == "__main__":
    main()
