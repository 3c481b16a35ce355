"""Tensor-parallel slicing of a model: this rank's 1/N of every attention and MLP layer.

Each rank holds 1/N of every layer, split by heads:

    q/k/v, gate/up   split by output rows   (AllToShardedLinear: no communication)
    o, down          split by input columns (ShardedToAllLinear: one all_sum of [B, L, dim])

so a layer costs two all_sums, one after attention and one after the MLP. Rank r keeps query
heads [r H/N, (r+1) H/N) and K/V heads [r KV/N, (r+1) KV/N): with KV % N == 0 these are the
K/V heads its query heads read, so attention needs no communication and each rank's rolling
cache holds only its K/V heads (1/N of the KV bytes). Embeddings, norms and the output head
stay whole on every rank (each rank computes the same logits and samples the same token).
"""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import MistralError
from .model import Mistral


def check_shardable(args: ModelArgs, size: int) -> None:
    """Raise MistralError unless every sharded dimension of `args` divides by `size` ranks."""
    if args.n_kv_heads % size:
        raise MistralError(
            f"cannot split {args.n_kv_heads} K/V heads over {size} ranks: n_kv_heads must be a multiple "
            f"of the number of ranks"
        )
    if args.hidden_dim % size:
        raise MistralError(f"cannot split the MLP's {args.hidden_dim} hidden units over {size} ranks")
    q = args.quantization
    for name, inputs in (("o_proj", args.n_heads * args.head_dim), ("down_proj", args.hidden_dim)):
        if q and (inputs // size) % q.group_size:
            raise MistralError(
                f"cannot split {name}'s {inputs} quantized input columns over {size} ranks: "
                f"{inputs // size} per rank is not a multiple of the group size {q.group_size}"
            )


def shard(model: Mistral, group: mx.distributed.Group) -> None:
    """Keep this rank's part of every attention and MLP layer of `model`, in place.

    Call it before the weights are evaluated (they are lazy after mx.load): the slices are
    taken from the lazy arrays, so a rank only ever evaluates its part (and, transiently,
    the checkpoint tensor it slices). Quantized layers are split the same way: output rows of
    weight/scales/biases for q/k/v/gate/up, input columns (whole groups) for o/down.
    model.args becomes this rank's share (heads and hidden units / N), so make_cache(model.args)
    allocates only this rank's K/V heads.
    """
    n = group.size()
    check_shardable(model.args, n)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module, names, sharding in ((attn, ("q_proj", "k_proj", "v_proj"), "all-to-sharded"),
                                        (attn, ("o_proj",), "sharded-to-all"),
                                        (mlp, ("gate_proj", "up_proj"), "all-to-sharded"),
                                        (mlp, ("down_proj",), "sharded-to-all")):
            for name in names:
                setattr(module, name, shard_linear(getattr(module, name), sharding, group=group))
        attn.n_heads //= n
        attn.n_kv_heads //= n
    a = model.args
    model.args = replace(a, n_heads=a.n_heads // n, n_kv_heads=a.n_kv_heads // n, hidden_dim=a.hidden_dim // n)


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of this rank's attention and MLP parameters (what sharding divides by N)."""
    return sum(v.nbytes for layer in model.model.layers for part in (layer.self_attn, layer.mlp)
               for _, v in tree_flatten(part.parameters()))
