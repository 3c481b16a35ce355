"""Mistral: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU.

Module and parameter names are Hugging Face's (the layout mlx-lm uses), so weights
load without renaming. The model holds no state: the caller passes the cache in.
"""

import os
import threading
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .cache import RollingKVCache
from .config import ModelArgs


class TransposedLinear(nn.Module):
    """A bias-free Linear whose weight is stored as [in, out] (`x @ weight_t`).

    OpenBLAS multiplies one token by an [in, out] matrix 1.3-2.3x faster than by the
    checkpoint's [out, in] (measured on the `small` preset's shapes), and decoding is
    one token at a time. Prompt chunks run at the same speed.
    """

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight_t = mx.contiguous(weight.T)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if 2 < rows < 16:  # OpenBLAS multiplies 16 rows faster than 3 to 15 (measured): pad
            x2 = mx.concatenate([x.reshape(rows, -1), mx.zeros((16 - rows, x.shape[-1]), x.dtype)])
            return (x2 @ self.weight_t)[:rows].reshape(*x.shape[:-1], -1)
        return x @ self.weight_t


_threads = threading.local()

# Below this many elements, a second stream costs more than it saves (measured: attention
# of one token over 3K scores takes 0.12 ms on one stream, 0.36 ms split over two).
SPLIT_MIN = 2**14


def on_cpu_streams(fn: Callable[..., mx.array], pieces: list[tuple], axis: int) -> mx.array:
    """fn(*piece) for each piece, each on its own CPU stream, concatenated along `axis`.

    An MLX CPU op (softmax, silu, the quantized matmul) runs on one core, but ops on
    separate streams run at once. The pieces are slices along an axis the op treats
    independently (output rows, heads, features), so the result is bit for bit that of
    one call. MLX streams belong to the thread that made them: these are this thread's.
    """
    streams = getattr(_threads, "streams", [])
    streams += [mx.new_stream(mx.cpu) for _ in range(len(pieces) - len(streams))]
    _threads.streams = streams
    outs = []
    for piece, stream in zip(pieces, streams):
        with mx.stream(stream):
            outs.append(fn(*piece))
    return mx.concatenate(outs, axis=axis)


def _slices(n: int, parts: int) -> list[slice]:
    step = -(-n // parts)
    return [slice(a, a + step) for a in range(0, n, step)]


class ParallelQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose output rows are split over CPU streams (on_cpu_streams).

    Each output is still computed by the same kernel from the same row of weights, so the
    result is bit for bit that of nn.QuantizedLinear (measured: 4-bit decode 1.6x on 2
    cores). The weights stay whole: a slice of leading rows is a view, not a copy.
    """

    def __init__(self, q: nn.QuantizedLinear, parts: int):
        nn.Module.__init__(self)  # not QuantizedLinear's, which would quantize a new matrix
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        self.group_size, self.bits, self.mode, self.parts = q.group_size, q.bits, q.mode, parts

    def __call__(self, x: mx.array) -> mx.array:
        def matmul(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
            return mx.quantized_matmul(x, w, scales, biases, True, self.group_size, self.bits)

        rows = _slices(self.weight.shape[0], self.parts)
        return on_cpu_streams(matmul, [(self.weight[r], self.scales[r], self.biases[r]) for r in rows], -1)


def prepare_for_cpu(model: nn.Module) -> None:
    """Switch `model` to the CPU backend's faster paths, in place: float nn.Linear (no bias)
    -> TransposedLinear, affine nn.QuantizedLinear -> ParallelQuantizedLinear, and
    attention and SwiGLU split over one CPU stream per core (`cpu_parts`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parts = min(cores, 8)
    swaps = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and "bias" not in module:
            swaps.append((path, TransposedLinear(module.weight)))
            mx.eval(swaps[-1][1].weight_t)  # one matrix at a time: the extra copy stays small
        elif type(module) is nn.QuantizedLinear and "bias" not in module and parts > 1 \
                and getattr(module, "mode", "affine") == "affine":
            swaps.append((path, ParallelQuantizedLinear(module, parts)))
        elif isinstance(module, (Attention, MLP)):
            module.cpu_parts = parts
    model.update_modules(tree_unflatten(swaps))


class Attention(nn.Module):
    cpu_parts = 0  # streams to split over on the CPU backend (set by prepare_for_cpu); 0 elsewhere

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.scale = args.head_dim**-0.5
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # HF weights have q/k rows permuted for the half-split ("non-traditional") RoPE.
        self.rope = nn.RoPE(args.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask, cache: RollingKVCache, layer: int) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, KV, L, hd)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=cache.rope_offset)
        k = self.rope(k, offset=cache.rope_offset)
        k, v = cache.update_and_fetch(layer, k, v)
        # The fused kernel takes n_kv_heads < n_heads as is: K/V are never repeated.
        if self.cpu_parts and L == 1:
            # One token: the n_heads / n_kv_heads query heads of a group become rows of one
            # query "sequence" against their K/V head. Same mask for every row, same result,
            # 2x faster on the CPU (one matmul per group instead of one per query head).
            q = q.reshape(B, self.n_kv_heads, -1, q.shape[-1])
        out = self.attend(q, k, v, mask).reshape(B, self.n_heads, L, -1)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
        def sdpa(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

        if self.cpu_parts < 2 or q.size // q.shape[-1] * k.shape[2] < SPLIT_MIN:
            return sdpa(q, k, v)
        rep = q.shape[1] // k.shape[1]  # each stream takes a group of K/V heads and their queries
        groups = _slices(k.shape[1], min(self.cpu_parts, k.shape[1]))
        return on_cpu_streams(sdpa, [(q[:, g.start * rep:g.stop * rep], k[:, g], v[:, g]) for g in groups], 1)


class MLP(nn.Module):
    cpu_parts = 0  # as Attention.cpu_parts

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.cpu_parts < 2 or gate.size < SPLIT_MIN:
            return self.down_proj(swiglu(gate, up))
        pieces = [(gate[..., f], up[..., f]) for f in _slices(gate.shape[-1], self.cpu_parts)]
        return self.down_proj(on_cpu_streams(swiglu, pieces, -1))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x: mx.array, mask, cache: RollingKVCache, layer: int) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)


class Mistral(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (that of the norms, which are never quantized)."""
        return self.model.norm.weight.dtype

    def __call__(self, tokens: mx.array, cache: RollingKVCache) -> mx.array:
        """tokens [B, L] at positions cache.offset.. -> logits [B, L, vocab]."""
        mask = cache.mask(tokens.shape[1])  # built once per step, shared by all layers
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, mask, cache, i)
        cache.advance(tokens.shape[1])
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
