"""python -m mlx_mistral.memory: KV-cache and weight memory of a Mistral config.

Reproduces the memory arithmetic of the Mistral 7B paper for any config: KV cache
of multi-head attention (MHA) vs grouped-query attention (GQA) vs GQA with the
rolling buffer, per token, per sequence length and per batch size, with the cache in
fp16 or quantized to 8 / 4 bits (--kv-bits), and weights at fp16 / 8-bit / 4-bit.
The cache figures are cross-checked against the bytes a real cache (make_cache) allocates.
"""

import argparse
import json
import sys
from dataclasses import replace

import mlx.core as mx

from .cache import check_kv_quantization
from .layered_cache import kv_slots, make_cache
from .config import ModelArgs
from .errors import MistralError, run_command

MISTRAL_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                       vocab_size=32000, sliding_window=4096, max_position_embeddings=32768)
# Ministral 8B 2410 (params.json: sliding_window [null, 32768, 32768, 32768], 128k context)
MINISTRAL_8B = ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=12288,
                         vocab_size=131072, rope_theta=1e8, layer_windows=(None, 32768, 32768, 32768) * 9,
                         max_position_embeddings=131072)
GROUP = 64  # quantization group size; each group stores a scale and a bias at 16 bits
# The larger Mistral models one may spread over several Macs (shapes from their config.json).
MODELS = {
    "Mistral 7B": MISTRAL_7B,
    "Mistral Nemo 12B": ModelArgs(dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128,
                                  hidden_dim=14336, vocab_size=131072),
    "Mistral Small 24B": ModelArgs(dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128,
                                   hidden_dim=32768, vocab_size=131072),
    "Mistral Large 123B": ModelArgs(dim=12288, n_layers=88, n_heads=96, n_kv_heads=8, head_dim=128,
                                    hidden_dim=28672, vocab_size=32768),
    "Mixtral 8x7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                              vocab_size=32000, rope_theta=1e6, n_experts=8, n_experts_per_tok=2),
    "Mixtral 8x22B": ModelArgs(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384,
                               vocab_size=32768, rope_theta=1e6, max_position_embeddings=65536, n_experts=8,
                               n_experts_per_tok=2),
}
PRESETS = {"mistral-7b": MISTRAL_7B, "ministral-8b": MINISTRAL_8B, "mixtral-8x7b": MODELS["Mixtral 8x7B"]}
MAC_GB = (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)  # Apple silicon memory sizes
USABLE = 0.75  # share of a Mac's memory the GPU may use by default (macOS's working-set limit)


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, heads: int | None = None,
                       bits: int | None = None, group: int = GROUP) -> int:
    """2 (K and V) x layers x KV heads x bytes per head vector; heads=n_heads gives MHA.

    A head vector is head_dim x dtype_bytes, or quantized to `bits`: head_dim x bits / 8
    bytes of codes plus a scale and a bias (dtype_bytes each) per `group` values.
    """
    per_head = args.head_dim * dtype_bytes if bits is None else \
        args.head_dim * bits // 8 + 2 * (args.head_dim // group) * dtype_bytes
    return 2 * args.n_layers * (heads or args.n_kv_heads) * per_head


def rolling_kv_bytes(args: ModelArgs, tokens: int, dtype_bytes: int = 2, bits: int | None = None,
                     group: int = GROUP) -> int:
    """One sequence's rolling-buffer KV cache at `tokens`: each layer holds the last
    min(tokens, its sliding window) tokens (a full-attention layer: all of them)."""
    per_layer = kv_bytes_per_token(args, dtype_bytes, bits=bits, group=group) // args.n_layers
    return per_layer * sum(min(tokens, window or tokens) for window in args.windows)


def row_cache(args: ModelArgs, max_kv_size: int | None, dtype_bytes: int, bits: int | None,
              group: int, headroom: int = 0) -> tuple[int, int, int]:
    """One served row's KV cache: (window: its largest layer's; context: the prompt and answer
    tokens it serves, where a model with a full-attention layer stops at its cache and a
    windowed one slides on; its bytes, K and V of every layer's slots: its window and
    `headroom` more, speculation's)."""
    windows = kv_slots(args, max_kv_size)
    per_slot = kv_bytes_per_token(args, dtype_bytes, bits=bits, group=group) // args.n_layers
    context = max(windows) if args.sliding_window is None else args.max_position_embeddings
    return max(windows), context, sum(w + headroom for w in windows) * per_slot


def kv_bytes(args: ModelArgs, tokens: int, batch: int = 1, dtype_bytes: int = 2, bits: int | None = None,
             group: int = GROUP) -> dict[str, int]:
    """KV cache bytes for `batch` sequences of `tokens`: MHA, GQA, GQA + rolling buffer."""
    gqa, mha = (kv_bytes_per_token(args, dtype_bytes, heads, bits, group) for heads in (None, args.n_heads))
    return {"mha": batch * tokens * mha, "gqa": batch * tokens * gqa,
            "gqa_rolling": batch * rolling_kv_bytes(args, tokens, dtype_bytes, bits, group)}


def layer_parameters(args: ModelArgs, active: bool = False) -> int:
    """Parameters in the attention and MLP matrices of all layers: with experts, all E of them
    and the router, or (`active`) the k a token goes through and the router."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    experts = (args.n_experts_per_tok if active else args.n_experts) if args.moe else 1
    router = args.dim * args.n_experts
    return args.n_layers * (attention + experts * 3 * args.dim * args.hidden_dim + router)


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(parameters in Linear/Embedding matrices, parameters in norms)."""
    matrices = layer_parameters(args) + args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    return matrices, (2 * args.n_layers + 1) * args.dim


def bits_per_weight(bits: int | None) -> float:
    """16, or `bits` plus a 16-bit scale and bias per group of GROUP weights."""
    return 16 if bits is None else bits + 32 / GROUP


def weight_bytes(args: ModelArgs, bits: int | None = None) -> int:
    """Weights at 16 bits, or quantized to `bits` (+16-bit scale and bias per group)."""
    matrices, norms = parameter_counts(args)
    return int(matrices * bits_per_weight(bits) / 8) + 2 * norms


def active_weight_bytes(args: ModelArgs, bits: int | None = None) -> int:
    """The weights one token reads (a Mixtral token: its k experts of E), what bounds decode speed."""
    return weight_bytes(args, bits) - int((layer_parameters(args) - layer_parameters(args, active=True))
                                          * bits_per_weight(bits) / 8)


def macs_that_fit(nbytes: int) -> list[int]:
    """The Mac memory sizes whose GPU share (USABLE) holds `nbytes` (a Mac's "16 GB" is 16 GiB)."""
    return [gb for gb in MAC_GB if nbytes <= USABLE * gb * 2**30]


def per_rank(args: ModelArgs, ranks: int, tokens: int, bits: int | None = None, kv_bits: int | None = None,
             kv_group: int = GROUP) -> dict[str, int]:
    """Bytes on each of `ranks` machines under tensor parallelism (distributed.py): attention
    and MLP weights and the KV cache (one sequence of `tokens`, fp16 or kv_bits) split by N;
    embeddings, output head and norms whole on every machine."""
    layers = int(layer_parameters(args) * bits_per_weight(bits) / 8)
    out = {"sharded_weights": layers // ranks, "whole_weights": weight_bytes(args, bits) - layers,
           "kv": rolling_kv_bytes(args, tokens, bits=kv_bits, group=kv_group) // ranks}
    return {**out, "total": sum(out.values())}


def ranks_report(args: ModelArgs, ranks: int, tokens: int, mac_gb: float, kv_bits: int | None = None,
                 kv_group: int = GROUP) -> dict:
    """Per-machine bytes of `args` on `ranks` machines, and which Mistral models fit on them."""
    from .shard import check_shardable

    check_shardable(replace(args, quantization=None), ranks)
    shard = replace(args, n_kv_heads=args.n_kv_heads // ranks)
    capacity = min(args.sliding_window or tokens, tokens, 4096, args.max_position_embeddings)
    kv = dict(kv_bits=kv_bits, kv_group=kv_group)
    measured = measured_kv_bytes(shard, capacity, bits=kv_bits, group=kv_group)
    if measured != rolling_kv_bytes(args, capacity, bits=kv_bits, group=kv_group) // ranks:
        raise MistralError(f"cache cross-check failed: a rank's cache allocates {measured} bytes")
    kinds = {"fp16": None, "8bit": 8, "4bit": 4}
    fits = {name: {k: per_rank(m, ranks, tokens, b, **kv)["total"] for k, b in kinds.items()}
            for name, m in MODELS.items() if m.n_kv_heads % ranks == 0}  # bytes per machine
    return {"ranks": ranks, "tokens": tokens, "mac_gb": mac_gb, "usable": USABLE,
            "kv_bits": kv_bits, "per_rank": {k: per_rank(args, ranks, tokens, b, **kv) for k, b in kinds.items()},
            "cross_check": {"capacity": capacity, "allocated_per_rank": measured}, "fits": fits}


def print_ranks_report(r: dict) -> None:
    n = r["ranks"]
    kv = f"{r['kv_bits']}-bit" if r["kv_bits"] else "fp16"
    print(f"on each of {n} machines, one sequence of {r['tokens']} tokens (KV {kv}; a rank's KV cache "
          f"of {r['cross_check']['capacity']} slots allocates {r['cross_check']['allocated_per_rank']} bytes, "
          f"1/{n} of one machine's):")
    print(f"{'weights':>8} {'layers (1/' + str(n) + ')':>22} {'embed + head (whole)':>22} {'KV':>22} {'total':>22}")
    for kind, b in r["per_rank"].items():
        print(f"{kind:>8} {gib(b['sharded_weights']):>22} {gib(b['whole_weights']):>22} {gib(b['kv']):>22} "
              f"{gib(b['total']):>22}")
    print(f"\nfits on {n} Macs of {r['mac_gb']:g} GB ({r['usable']:.0%} usable by the GPU), "
          f"{r['tokens']} tokens of context:")
    budget = r["usable"] * r["mac_gb"] * 1e9
    for name, fit in r["fits"].items():
        print(f"  {name:<20} " + "   ".join(f"{k} {b / 1e9:6.1f} GB {'fits' if b <= budget else 'no  '}"
                                             for k, b in fit.items()))


def measured_kv_bytes(args: ModelArgs, capacity: int, batch: int = 1, bits: int | None = None,
                      group: int = GROUP) -> int:
    """Bytes a real cache allocates (float16, or quantized) for `capacity` slots (fewer in a
    layer with a smaller window)."""
    cache = make_cache(args, capacity, batch, mx.float16, kv_bits=bits, kv_group_size=group)
    nbytes = cache.nbytes
    del cache
    return nbytes


def report(args: ModelArgs, lengths: list[int], batches: list[int], budget_gb: float | None,
           bits: int | None = None, group: int = GROUP) -> dict:
    """The tables, with the KV cache in fp16 or quantized to `bits` in groups of `group`."""
    q = dict(bits=bits, group=group)
    per_token_gqa, per_token_mha = kv_bytes_per_token(args, **q), kv_bytes_per_token(args, heads=args.n_heads, **q)
    # keep the real allocation modest
    check_capacity = min(args.sliding_window or 4096, 4096, args.max_position_embeddings)
    measured = measured_kv_bytes(args, check_capacity, **q)
    expected = rolling_kv_bytes(args, check_capacity, **q)
    if measured != expected:
        raise MistralError(f"cache cross-check failed: allocated {measured} bytes, formula says {expected}")
    out = {
        "config": {k: v for k, v in vars(args).items() if k != "quantization"},
        "kv_bits": bits, "kv_group_size": group,
        "kv_per_token": {"mha": per_token_mha, "gqa": per_token_gqa, "ratio": per_token_mha / per_token_gqa},
        "cross_check": {"capacity": check_capacity, "allocated": measured, "formula": expected},
        "by_length": {n: kv_bytes(args, n, **q) for n in lengths},
        "by_batch": {b: kv_bytes(args, max(lengths), b, **q) for b in batches},
        "by_kv_bits": {n: {name: kv_bytes(args, n, bits=b, group=group)["gqa_rolling"]
                           for name, b in (("fp16", None), ("8bit", 8), ("4bit", 4))} for n in lengths},
        "weights": {"fp16": weight_bytes(args), "8bit": weight_bytes(args, 8), "4bit": weight_bytes(args, 4)},
        "active_weights": {"fp16": active_weight_bytes(args), "8bit": active_weight_bytes(args, 8),
                           "4bit": active_weight_bytes(args, 4)},
        "parameters": sum(parameter_counts(args)),
    }
    n = max(lengths)
    out["fits"] = {w: {"bytes": wb + out["by_length"][n]["gqa_rolling"], "tokens": n,
                       "macs_gb": macs_that_fit(wb + out["by_length"][n]["gqa_rolling"])}
                   for w, wb in out["weights"].items()}
    if budget_gb:
        budget, n = budget_gb * 1e9, max(lengths)
        out["max_batch"] = {
            w: {kind: max(0, int((budget - wb) // per_seq)) for kind, per_seq in kv_bytes(args, n, **q).items()}
            for w, wb in out["weights"].items()
        }
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB ({n / 1e9:.2f} GB)" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def windows_text(config: dict) -> str:
    """The sliding window, or each layer's as "4096 x 27, none x 9" (none: full attention)."""
    windows = config["layer_windows"]
    if not windows:
        return str(config["sliding_window"])
    return "per layer " + ", ".join(f"{w or 'none'} x {windows.count(w)}" for w in dict.fromkeys(windows))


def print_report(r: dict, budget_gb: float | None) -> None:
    c, kv = r["config"], r["kv_per_token"]
    print(f"config: {c['n_layers']} layers, {c['n_heads']} heads, {c['n_kv_heads']} KV heads, head_dim "
          f"{c['head_dim']}, window {windows_text(c)}; {r['parameters'] / 1e9:.2f}B parameters")
    bits = f"{r['kv_bits']}-bit, group {r['kv_group_size']}" if r["kv_bits"] else "fp16"
    print(f"KV cache per token ({bits}): MHA {kv['mha'] / 1024:.0f} KiB, GQA {kv['gqa'] / 1024:.0f} KiB "
          f"({kv['ratio']:.0f}x smaller)")
    x = r["cross_check"]
    print(f"cross-check: a KV cache of {x['capacity']} slots allocates {x['allocated']} bytes "
          f"(formula {x['formula']}): {'OK' if x['allocated'] == x['formula'] else 'MISMATCH'}")
    print(f"\n{'tokens':>8} {'MHA':>22} {'GQA':>22} {'GQA + rolling buffer':>22} {'saving':>7}")
    for n, b in r["by_length"].items():
        print(f"{n:>8} {gib(b['mha']):>22} {gib(b['gqa']):>22} {gib(b['gqa_rolling']):>22} "
              f"{b['gqa'] / b['gqa_rolling']:>6.1f}x")
    print(f"\n{'tokens':>8} {'GQA + rolling, fp16':>22} {'8-bit K/V':>22} {'4-bit K/V':>22}")
    for n, b in r["by_kv_bits"].items():
        print(f"{n:>8} {gib(b['fp16']):>22} {gib(b['8bit']):>22} {gib(b['4bit']):>22}")
    n = max(r["by_length"])
    print(f"\n{'batch':>8} {'MHA @' + str(n):>22} {'GQA @' + str(n):>22} {'GQA + rolling':>22}")
    for bsz, b in r["by_batch"].items():
        print(f"{bsz:>8} {gib(b['mha']):>22} {gib(b['gqa']):>22} {gib(b['gqa_rolling']):>22}")
    print("\nweights: " + ", ".join(f"{k} {gib(v)}" for k, v in r["weights"].items()))
    if r["active_weights"] != r["weights"]:
        print(f"read per token ({c['n_experts_per_tok']} of {c['n_experts']} experts): "
              + ", ".join(f"{k} {gib(v)}" for k, v in r["active_weights"].items()))
    for w, f in r["fits"].items():
        fits = ", ".join(f"{gb} GB" for gb in f["macs_gb"]) or "none"
        print(f"weights {w} + one {f['tokens']}-token KV cache (fp16 unless --kv-bits): {gib(f['bytes'])}; "
              f"fits Macs of {fits} ({USABLE:.0%} usable by the GPU)")
    if budget_gb:
        print(f"\nlargest batch of {n}-token sequences in {budget_gb:g} GB (weights + KV cache):")
        for w, m in r["max_batch"].items():
            print(f"  weights {w:>5}: MHA {m['mha']:>4}   GQA {m['gqa']:>4}   GQA + rolling {m['gqa_rolling']:>4}")


def run(a: argparse.Namespace) -> int:
    if a.model in PRESETS:
        args = PRESETS[a.model]
    else:
        from pathlib import Path

        from .loading import read_config

        args = read_config(Path(a.model))
    if a.window is not None:
        args = replace(args, sliding_window=a.window or None, layer_windows=None)
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError as e:
        raise MistralError(f"--lengths/--batches must be comma-separated integers ({e})") from None
    if min(lengths + batches) <= 0:
        raise MistralError("--lengths and --batches must be positive integers")
    check_kv_quantization(args, a.kv_bits, a.kv_group_size, mx.float16)
    if a.ranks is not None:
        if a.ranks <= 0:
            raise MistralError(f"--ranks must be a positive integer, got {a.ranks}")
        r = ranks_report(args, a.ranks, max(lengths), a.mac_gb, a.kv_bits, a.kv_group_size)
        print(json.dumps(r)) if a.json else print_ranks_report(r)
        return 0
    r = report(args, lengths, batches, a.budget_gb, a.kv_bits, a.kv_group_size)
    if a.json:
        print(json.dumps(r))
    else:
        print_report(r, a.budget_gb)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_mistral.memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mistral-7b",
                   help="'mistral-7b' (v0.1 shape), 'ministral-8b', 'mixtral-8x7b', or a checkpoint directory")
    p.add_argument("--window", type=int, help="override the sliding window of every layer (0 = none)")
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--kv-bits", type=int, help="the KV cache quantized to 8 or 4 bits (default: fp16)")
    p.add_argument("--kv-group-size", type=int, default=GROUP, help="KV quantization group along head_dim")
    p.add_argument("--budget-gb", type=float, help="also show the largest batch fitting this memory budget")
    p.add_argument("--ranks", type=int, help="machines the model is split over (mlx.launch): memory per machine")
    p.add_argument("--mac-gb", type=float, default=64, help="with --ranks: memory of each Mac, in GB")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    return run_command(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
