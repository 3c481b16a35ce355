"""Mistral: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU.

Module and parameter names are Hugging Face's (the layout mlx-lm uses), so weights
load without renaming. The model holds no state: the caller passes the cache in.
"""

import os
import threading

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


def _cpu_streams(n: int) -> list[mx.Stream]:
    """n CPU streams of the calling thread (MLX streams belong to the thread that made them)."""
    if len(getattr(_threads, "streams", ())) != n:
        _threads.streams = [mx.new_stream(mx.cpu) for _ in range(n)]
    return _threads.streams


class ParallelQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose output rows are split over one CPU stream per core.

    MLX's CPU quantized matmul runs on one thread; separate streams run at once. Each
    output is still computed by the same kernel from the same row of weights, so the
    result is bit for bit that of nn.QuantizedLinear (measured: decode 1.7x on 2 cores).
    The weights stay whole: a slice of leading rows is a view, not a copy.
    """

    def __init__(self, q: nn.QuantizedLinear, parts: int):
        nn.Module.__init__(self)  # not QuantizedLinear's, which would quantize a new matrix
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        self.group_size, self.bits, self.mode, self.parts = q.group_size, q.bits, q.mode, parts

    def __call__(self, x: mx.array) -> mx.array:
        n = self.weight.shape[0]
        step = -(-n // self.parts)
        return mx.concatenate([
            mx.quantized_matmul(x, self.weight[a:a + step], self.scales[a:a + step], self.biases[a:a + step],
                                transpose=True, group_size=self.group_size, bits=self.bits, stream=s)
            for a, s in zip(range(0, n, step), _cpu_streams(self.parts))
        ], axis=-1)


def prepare_for_cpu(model: nn.Module) -> None:
    """Swap in the CPU-backend layers, in place: float nn.Linear (no bias) -> TransposedLinear,
    affine nn.QuantizedLinear -> ParallelQuantizedLinear."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    swaps = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and "bias" not in module:
            swaps.append((path, TransposedLinear(module.weight)))
            mx.eval(swaps[-1][1].weight_t)  # one matrix at a time: the extra copy stays small
        elif type(module) is nn.QuantizedLinear and "bias" not in module and cores > 1 \
                and getattr(module, "mode", "affine") == "affine":
            swaps.append((path, ParallelQuantizedLinear(module, min(cores, 8))))
    model.update_modules(tree_unflatten(swaps))


class Attention(nn.Module):
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
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


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
