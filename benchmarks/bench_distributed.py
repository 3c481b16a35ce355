"""Tensor parallelism on 1 vs 2 local ranks (mlx.launch, ring backend on 127.0.0.1).

Per rank: prefill and decode tok/s, peak memory after loading and after generating, the
bytes of layers and KV it holds, and the bytes its all_sums carry per token (two [B, L, dim]
all_sums per layer plus rank 0's token). Then what a link of --link-gbps GB/s (Thunderbolt 5:
~10) and --latency-us per all_sum would add per token for Mistral 7B and 123B.

On one machine the two ranks share its cores and talk over loopback, so 2 ranks are slower;
what this shows is the memory per rank and that it works, not a speed-up.

    python benchmarks/bench_distributed.py [--preset small] [--quantize 4] [--prompt 128] [--tokens 16] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_mistral import distributed, make_cache, make_sampler, shard  # noqa: E402
from mlx_mistral.generate import generate_step  # noqa: E402
from mlx_mistral.memory import MODELS  # noqa: E402


def comm_bytes_per_token(dim: int, n_layers: int, dtype_bytes: int) -> int:
    """What the all_sums of one decoded token carry: 2 per layer of [1, 1, dim], plus the token."""
    return 2 * n_layers * dim * dtype_bytes + 4


def worker(model_dir: str, prompt: int, tokens: int, out: str) -> None:
    """One rank (or the only process): load, prefill `prompt` tokens, decode `tokens`."""
    group = distributed.init(120)
    rank, n = (group.rank(), group.size()) if group else (0, 1)
    mx.reset_peak_memory()
    if group:
        model, _ = distributed.load(model_dir, group)
        sampler = distributed.shared_sampler(make_sampler(), group)
    else:
        model, _ = mlx_mistral.load(model_dir)
        sampler = make_sampler()
    load_peak = mx.get_peak_memory()
    ids = list(range(1000, 1000 + prompt))
    cache = make_cache(model.args, prompt + tokens + 1, dtype=model.dtype)
    start = time.perf_counter()
    steps = generate_step(model, ids, cache, sampler)
    next(steps)
    first = time.perf_counter()
    for _ in range(tokens):
        next(steps)
    end = time.perf_counter()
    latency = float("nan")
    if group:  # one all_sum the size of a decode step's, alone: the link's round trip here
        x = mx.ones((1, 1, model.args.dim), model.dtype)
        mx.eval(mx.distributed.all_sum(x, group=group))
        t = time.perf_counter()
        for _ in range(50):
            mx.eval(mx.distributed.all_sum(x, group=group))
        latency = (time.perf_counter() - t) / 50
    mx.synchronize()
    if group:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
    dtype_bytes = model.dtype.size
    result = {
        "ranks": n, "rank": rank, "prefill_tps": prompt / (first - start), "decode_tps": tokens / (end - first),
        "load_peak_bytes": load_peak, "peak_bytes": mx.get_peak_memory(),
        "layer_bytes": shard.sharded_bytes(model), "kv_bytes": cache.nbytes,
        "comm_bytes_per_token": comm_bytes_per_token(model.args.dim, model.args.n_layers, dtype_bytes) if group else 0,
        "all_sum_latency_s": latency,
    }
    Path(out, f"rank{rank}-of-{n}.json").write_text(json.dumps(result))


def link_cost(gbps: float, latency_us: float) -> dict:
    """Per decoded token on a 2-rank ring: bytes each rank sends (fp16 activations; a 2-rank
    all_sum sends its whole payload once) and the time at `gbps` GB/s plus `latency_us` per all_sum."""
    out = {}
    for name in ("Mistral 7B", "Mistral Large 123B"):
        a = MODELS[name]
        sent = comm_bytes_per_token(a.dim, a.n_layers, 2)
        all_sums = 2 * a.n_layers + 1
        out[name] = {"bytes_per_token": sent, "all_sums_per_token": all_sums,
                     "transfer_ms": sent / (gbps * 1e9) * 1e3, "latency_ms": all_sums * latency_us / 1e3,
                     "prefill_512_ms": 512 * (sent - 4) / (gbps * 1e9) * 1e3 + all_sums * latency_us / 1e3}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "small", "7b"), default="small")
    p.add_argument("--model", help="a checkpoint directory instead of a preset")
    p.add_argument("--quantize", type=int, choices=(4, 8))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens")
    p.add_argument("--link-gbps", type=float, default=10.0, help="link bandwidth for the estimate (GB/s)")
    p.add_argument("--latency-us", type=float, default=30.0, help="assumed latency per all_sum on that link")
    p.add_argument("--port", type=int, default=39323, help="first ring port on 127.0.0.1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], a.prompt, a.tokens, a.worker[1])
        return
    from presets import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as out:
        model_dir = a.model or str(make_checkpoint(a.preset, quantize=a.quantize, root=Path(out)))
        me = [sys.executable, __file__, "--prompt", str(a.prompt), "--tokens", str(a.tokens), "--worker", model_dir, out]
        env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
        subprocess.run(me, check=True, env=env, timeout=600)
        launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(a.port),
                  "--"]
        subprocess.run(launch + me, check=True, env=env, timeout=600)
        rows = [json.loads((Path(out) / f).read_text())
                for f in ("rank0-of-1.json", "rank0-of-2.json", "rank1-of-2.json")]
    result = {"model": a.model or a.preset, "quantize": a.quantize, "prompt": a.prompt, "tokens": a.tokens,
              "ranks": rows, "link": {"gbps": a.link_gbps, "latency_us": a.latency_us,
                                      "per_token": link_cost(a.link_gbps, a.latency_us)}}
    if a.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(f"{result['model']}{' ' + str(a.quantize) + '-bit' if a.quantize else ''}: {a.prompt}-token prompt, "
          f"{a.tokens} decoded tokens, one machine ({os.cpu_count()} cores), ring over loopback")
    print(f"{'ranks':>5} {'rank':>4} {'prefill tok/s':>13} {'decode tok/s':>12} {'load peak MiB':>13} "
          f"{'peak MiB':>9} {'layers MiB':>10} {'KV MiB':>7} {'all_sum bytes/token':>19} {'all_sum ms':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['rank']:>4} {r['prefill_tps']:>13.1f} {r['decode_tps']:>12.1f} "
              f"{r['load_peak_bytes'] / mib:>13.1f} {r['peak_bytes'] / mib:>9.1f} {r['layer_bytes'] / mib:>10.1f} "
              f"{r['kv_bytes'] / mib:>7.2f} {r['comm_bytes_per_token']:>19} {r['all_sum_latency_s'] * 1e3:>10.3f}")
    print(f"\n2 Macs on a {a.link_gbps:g} GB/s link, {a.latency_us:g} us per all_sum (assumed), fp16, per token:")
    for name, c in result["link"]["per_token"].items():
        print(f"  {name:<20} {c['bytes_per_token'] / 1024:8.0f} KiB in {c['all_sums_per_token']} all_sums: "
              f"{c['transfer_ms']:.3f} ms transfer + {c['latency_ms']:.2f} ms latency per decoded token; "
              f"a 512-token prefill chunk {c['prefill_512_ms']:.1f} ms")


if __name__ == "__main__":
    main()
