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
from .moe import SparseMoE


def check_shardable(args: ModelArgs, size: int) -> None:
    """Raise MistralError unless every sharded dimension of `args` divides by `size` ranks."""
    if args.n_kv_heads % size:
        raise MistralError(
            f"cannot split {args.n_kv_heads} K/V heads over {size} ranks: n_kv_heads must be a multiple "
            f"of the number of ranks"
        )
    if args.hidden_dim % size:
        raise MistralError(f"cannot split the MLP's {args.hidden_dim} hidden units over {size} ranks"
                           + (" (each expert's)" if args.moe else ""))
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
        attn = layer.self_attn
        parts = [(attn, ("q_proj", "k_proj", "v_proj"), "all-to-sharded"), (attn, ("o_proj",), "sharded-to-all")]
        if model.args.moe:
            shard_experts(layer.block_sparse_moe, group)
        else:
            parts += [(layer.mlp, ("gate_proj", "up_proj"), "all-to-sharded"),
                      (layer.mlp, ("down_proj",), "sharded-to-all")]
        for module, names, sharding in parts:
            for name in names:
                setattr(module, name, shard_linear(getattr(module, name), sharding, group=group))
        attn.n_heads //= n
        attn.n_kv_heads //= n
    a = model.args
    model.args = replace(a, n_heads=a.n_heads // n, n_kv_heads=a.n_kv_heads // n, hidden_dim=a.hidden_dim // n)


def shard_experts(moe: SparseMoE, group: mx.distributed.Group) -> None:
    """Keep this rank's 1/N of every expert, split along its hidden axis as the dense MLP is:
    output rows of gate/up, input columns of down (of weight, scales and biases alike: whole
    groups, see check_shardable). The router stays whole, so every rank picks the same
    experts; the block's output is summed over the ranks (SparseMoE.group)."""
    n, r = group.size(), group.rank()
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
        proj = getattr(moe.switch_mlp, name)
        for key, w in proj.parameters().items():
            step = w.shape[axis] // n
            proj[key] = w[(slice(None),) * axis + (slice(r * step, (r + 1) * step),)]
    moe.group = group


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of this rank's attention and MLP (or experts') parameters: what sharding divides by N."""
    ffn = (lambda layer: layer.feed_forward.switch_mlp) if model.args.moe else (lambda layer: layer.feed_forward)
    return sum(v.nbytes for layer in model.model.layers for part in (layer.self_attn, ffn(layer))
               for _, v in tree_flatten(part.parameters()))
