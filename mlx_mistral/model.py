"""Mistral: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU (or Mixtral's experts: moe.py).

Module and parameter names are Hugging Face's (the layout mlx-lm uses), so weights
load without renaming. The model holds no state: the caller passes the cache in.
"""

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .errors import MistralError
from .layered_cache import KVCache
from .moe import SparseMoE
from .rope import RoPE
from .vision import Projector, VisionTower, image_features


class Attention(nn.Module):
    fold_gqa = False  # True on the CPU backend (set by cpu.prepare_for_cpu)
    # On the CPU backend: () -> this thread's CPU streams, one per core, to run the K/V heads of
    # quantized_attention at once (MLX's CPU quantized_matmul uses one core: 2x on 2 cores at
    # 16k tokens of context). Set by cpu.prepare_for_cpu; None: the default stream.
    head_streams = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.scale = args.attention_scale
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # HF weights have q/k rows permuted for the half-split ("non-traditional") RoPE.
        self.rope = RoPE(args.head_dim, args.rope_theta, args.yarn)
        self.query_scaling = args.query_scaling

    def __call__(self, x: mx.array, mask, cache: KVCache, layer: int) -> mx.array:
        B, L, _ = x.shape
        # One product where fused.fuse_projections stacked the three matrices.
        q, k, v = self.qkv(x) if "qkv" in self else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, KV, L, hd)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=cache.rope_offset)
        k = self.rope(k, offset=cache.rope_offset)
        if self.query_scaling:  # after RoPE, queries only: the cached keys are plain
            q = q * self.query_scaling(cache.rope_offset, L).astype(q.dtype)
        k, v = cache.update_and_fetch(layer, k, v)
        if cache.bits:
            streams = self.head_streams() if self.head_streams else None
            out = quantized_attention(q * self.scale, k, v, mask, cache.group_size, cache.bits, streams)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        # The fused kernel takes n_kv_heads < n_heads as is: K/V are never repeated.
        if self.fold_gqa and L == 1:
            # One token: the n_heads / n_kv_heads query heads of a group become rows of one
            # query "sequence" against their K/V head. Same mask for every row, same result,
            # 2x faster on the CPU (one matmul per group instead of one per query head).
            q = q.reshape(B, self.n_kv_heads, -1, q.shape[-1])
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.reshape(B, self.n_heads, L, -1)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def quantized_attention(q: mx.array, k: tuple, v: tuple, mask, group_size: int, bits: int,
                        streams: list[mx.Stream] | None = None) -> mx.array:
    """softmax(q K^T) V with K and V in mx.quantize's format, never dequantized.

    q [B, H, L, hd] (already scaled); k, v (codes, scales, biases) of [B, n_kv, S, .].
    One K/V head at a time, with the GQA fold: the H / n_kv query heads of the group
    become rows of one query against their K/V head, so K/V are never repeated. A head's
    slots [:S] of a one-row buffer are contiguous, so quantized_matmul reads the cache in
    place (all heads at once, the strided view would be copied: a layer's K/V per step).
    What grows with the context is the score matrix: [B, H / n_kv * L, S] per head, though
    MLX may hold every head's at once (measured: H * L float32 per token of context).
    `streams`: K/V head h runs on streams[h * len(streams) // n_kv] (heads are independent).
    """
    B, H, L, hd = q.shape
    n_kv = k[0].shape[1]
    rep = H // n_kv
    q = q.reshape(B, n_kv, rep * L, hd)  # rows: (query head in the group, position)
    if isinstance(mask, str):  # "causal": a first chunk, keys = queries
        mask = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    elif mask is not None and mask.ndim == 4:  # [B, 1, 1, S] (ragged decode): one more axis for rep
        mask = mask[:, :, None]
    streams = streams or [mx.default_stream(mx.default_device())]
    outs = []
    for h in range(n_kv):
        with mx.stream(streams[h * len(streams) // n_kv]):
            kh, vh = (tuple(x[:, h:h + 1] for x in kv) for kv in (k, v))
            scores = mx.quantized_matmul(q[:, h:h + 1], *kh, transpose=True, group_size=group_size, bits=bits)
            if mask is not None:
                scores = mx.where(mask, scores.reshape(B, 1, rep, L, -1), -mx.inf).reshape(B, 1, rep * L, -1)
            probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
            outs.append(mx.quantized_matmul(probs, *vh, transpose=False, group_size=group_size, bits=bits))
    return mx.concatenate(outs, axis=1).reshape(B, H, L, hd)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_up(x) if "gate_up" in self else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(nn.silu(gate) * up)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.moe:  # mlx-lm's (and HF's) name for Mixtral's block
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x: mx.array, mask, cache: KVCache, layer: int) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, layer)
        return h + self.feed_forward(self.post_attention_layernorm(h))

    @property
    def feed_forward(self) -> nn.Module:
        """The dense MLP, or the sparse mixture of experts."""
        return self["block_sparse_moe"] if "block_sparse_moe" in self else self.mlp


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
        if args.vision:  # an image model: its vision tower and projector (transformers' names)
            self.vision_tower = VisionTower(args.vision)
            self.multi_modal_projector = Projector(args.vision)

    def image_features(self, images: list[mx.array]) -> list[mx.array]:
        """Each image's features, in place of its [IMG] tokens' embeddings (see vision.py)."""
        if "vision_tower" not in self:
            raise MistralError("this model has no vision tower: it takes text only")
        return image_features(self.vision_tower, self.multi_modal_projector, images)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (that of the norms, which are never quantized)."""
        return self.model.norm.weight.dtype

    def __call__(self, tokens: mx.array, cache: KVCache, images: tuple[mx.array, mx.array] | None = None
                 ) -> mx.array:
        """tokens [B, L] at positions cache.offset.. -> logits [B, L, vocab]. `images`: (the flat
        indices into [B * L] of the tokens whose embeddings are image features, those features
        [n, dim]): vision.Vision's, in place of the [IMG] tokens' embeddings."""
        masks = cache.layer_masks(tokens.shape[1])  # built once per step per window, shared by its layers
        h = self.model.embed_tokens(tokens)
        if images is not None:
            at, features = images
            B, L, D = h.shape
            h = h.reshape(B * L, D)
            h[at] = features.astype(h.dtype)
            h = h.reshape(B, L, D)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, masks[i], cache, i)
        cache.advance(tokens.shape[1])
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
