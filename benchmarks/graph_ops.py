"""Ops per decoded token from the unevaluated graph: nothing is computed, so any preset counts
(the 7b one included, whose float32 weights do not fit this machine). Ours and mlx-lm's.

    python benchmarks/graph_ops.py [--preset 7b] [--context 128]

A decode step's logits are built lazily over a model whose weights are never evaluated; the ops
are the primitives in mx.export_to_dot of those logits, less those that only make the weights
(their random initialisation). Ours is built as `load` builds it on this backend (fused q/k/v and
gate/up; the CPU paths with the checkpoint's [out, in] layout, what transposed_pays chooses for
the SmolLM2 shape here). The CPU backend expands mx.fast's RMSNorm, RoPE and attention into
their fallback graphs; on Metal each is one kernel, so there the counts are lower for both.
"""

import argparse
import io
from unittest import mock

import mlx_mistral  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from presets import PRESETS, preset_args


def ops(*arrays: mx.array) -> int:
    """Primitives in the unevaluated graphs of `arrays` (each counted once)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def ours(args, context: int) -> int:
    from mlx_mistral import cpu, make_cache
    from mlx_mistral.fused import fuse_projections
    from mlx_mistral.model import Mistral

    model = Mistral(args)
    with mock.patch.object(mx, "eval"):  # fuse lazily: the weights stay unevaluated
        fuse_projections(model)
        if cpu.cpu_paths_on():
            with mock.patch.object(cpu, "transposed_pays", return_value=False):
                cpu.prepare_for_cpu(model)
    cache = make_cache(args, context + 8)
    cache.offsets = [context]  # the step after `context` tokens (the K/V values do not change the graph)
    weights = [w for _, w in tree_flatten(model.parameters())]
    return ops(model(mx.array([[1]]), cache), *weights) - ops(*weights)


def mlx_lm(args, context: int) -> int:
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = llama.Model(llama.ModelArgs.from_dict(args.to_hf() | {"model_type": "llama"}))
    cache = make_prompt_cache(model)
    for layer in cache:  # `context` tokens held (zeros: the values do not change the graph)
        shape = (1, args.n_kv_heads, context, args.head_dim)
        layer.update_and_fetch(mx.zeros(shape), mx.zeros(shape))
    mx.eval([layer.state for layer in cache])
    weights = [w for _, w in tree_flatten(model.parameters())]
    return ops(model(mx.array([[1]]), cache=cache), *weights) - ops(*weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="7b")
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    a = p.parse_args()
    args = preset_args(a.preset, sliding_window=None)  # mlx-lm ignores windows: compare windowless
    counts = {"mlx_mistral": ours(args, a.context), "mlx_lm": mlx_lm(args, a.context)}
    for runtime, n in counts.items():
        print(f"{a.preset}, after {a.context} tokens: {runtime} {n} ops per decoded token "
              f"({n / args.n_layers:.1f} per layer)")


if __name__ == "__main__":
    main()
