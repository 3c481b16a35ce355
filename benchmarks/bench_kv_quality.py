"""Quality of the 8- and 4-bit KV cache against the float cache: mean KL and top-1 agreement.

Feeds the same random token ids (default: 2048 positions of the `small` preset, windowless,
in prefill chunks of 512) through a float cache and quantized caches side by side, and
compares the next-token distributions at every position. Random weights give flat
distributions, so top-1 is a weak signal here (near-ties); KL is the figure to watch.

    python benchmarks/bench_kv_quality.py [--preset small] [--positions 2048] [--kv-bits 8,4] [--json]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402


def main() -> None:
    from presets import kv_bench_parser, load_windowless

    from mlx_mistral import make_cache

    p = kv_bench_parser(__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512)
    a = p.parse_args()
    model, _, _ = load_windowless(a)
    bits = [int(b) for b in a.kv_bits.split(",")]
    caches = {b: make_cache(model.args, a.positions, dtype=model.dtype, kv_bits=b, kv_group_size=a.kv_group_size)
              for b in [None] + bits}
    ids = mx.random.randint(3, model.args.vocab_size, (1, a.positions), key=mx.random.key(0))
    kl = {b: 0.0 for b in bits}
    top1 = {b: 0 for b in bits}
    for start in range(0, a.positions, a.chunk):
        chunk = ids[:, start:start + a.chunk]
        logits = {b: model(chunk, c)[0].astype(mx.float32) for b, c in caches.items()}
        logp = {b: x - mx.logsumexp(x, axis=-1, keepdims=True) for b, x in logits.items()}
        ref = logp[None]
        for b in bits:
            kl[b] += mx.sum(mx.exp(ref) * (ref - logp[b])).item()
            top1[b] += mx.sum(mx.argmax(ref, axis=-1) == mx.argmax(logp[b], axis=-1)).item()
        mx.eval([c.keys for c in caches.values()])
    out = {b: {"mean_kl": kl[b] / a.positions, "top1": top1[b] / a.positions,
               "kv_bytes": caches[b].nbytes, "float_kv_bytes": caches[None].nbytes} for b in bits}
    if a.json:
        print(json.dumps({"preset": a.preset, "positions": a.positions, "results": out}))
        return
    print(f"{a.model or a.preset} (windowless), {a.positions} positions, chunks of {a.chunk}, group {a.kv_group_size}")
    for b, r in out.items():
        print(f"{b}-bit K/V vs float: mean KL {r['mean_kl']:.2e}, top-1 agreement {r['top1']:.4f}, "
              f"KV {r['kv_bytes'] / 2**20:.1f} MiB vs {r['float_kv_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
