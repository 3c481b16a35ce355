"""Mixtral's sparse mixture of experts: the feed-forward block that replaces the dense MLP.

A router picks, for every token, the k experts (of E) with the highest logits; the output
is the sum of those experts' SwiGLU outputs weighted by the softmax of their router logits
(over the k only: equal to transformers' softmax over all E renormalised over the k).
Each projection's E experts are stacked into one [E, out, in] weight (mlx-lm's names and
layout, `switch_mlp.{gate,up,down}_proj`), and a token's experts are applied with MLX's
gather matmuls: no Python loop over experts or tokens.
"""

import math
import re

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .errors import MistralError

# From this many (token, expert) pairs on, the pairs are sorted by expert first, so that each
# expert's weights are read once per chunk (prefill) rather than once per token.
SORT_FROM = 64


def is_router(path: str) -> bool:
    """Whether a module path is a router (`convert` keeps routers unquantized: they are 0.01% of
    Mixtral's bytes, and a token's experts are a discrete choice that a 4-bit error can flip)."""
    return path.endswith("block_sparse_moe.gate")


class SwitchLinear(nn.Module):
    """E stacked bias-free Linears: weight [E, out, in]; row i of x goes through expert indices[i]."""

    def __init__(self, input_dims: int, output_dims: int, n_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (n_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU GatherMM takes float32 only (Metal takes half types as they are): the same
            # product in float32, rounded to x's dtype (a correctness path; CPU runs use float32).
            out = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices,
                               sorted_indices=sorted_indices)
            return out.astype(x.dtype)
        return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with each expert's weight in mx.quantize's format (mlx-lm's layout)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, self.biases = mx.quantize(weight, group_size, bits, mode=mode)
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    """The experts' SwiGLU, down(silu(gate(x)) * up(x)), each token through its k experts."""

    # On the CPU backend (set by cpu.prepare_for_cpu for float experts): a chunk of SORT_FROM or
    # more pairs runs every expert on every token as plain matmuls and keeps each token's k. MLX's
    # CPU GatherMM multiplies row by row: 4.1 s for 512 tokens of `small-moe`'s experts, against
    # 0.6 s for all 8 experts through BLAS (4x the arithmetic, 7x faster). Decode keeps the gather.
    every_expert_for_chunks = False

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, n_experts)
        self.up_proj = SwitchLinear(dim, hidden_dim, n_experts)
        self.down_proj = SwitchLinear(hidden_dim, dim, n_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> [..., k, D]."""
        if self.every_expert_for_chunks and indices.size >= SORT_FROM:
            return self._every_expert(x, indices)
        shape = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]: one row per (token, expert) pair
        order = None
        if indices.size >= SORT_FROM:  # pairs sorted by expert: gather_mm reads each expert once
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, indices = x.flatten(0, -3)[order // shape[-1]], flat[order]
        h = nn.silu(self.gate_proj(x, indices, order is not None)) * self.up_proj(x, indices, order is not None)
        y = self.down_proj(h, indices, order is not None)
        if order is not None:  # back to the tokens' order
            y = mx.unflatten(y[mx.argsort(order)], 0, shape)
        return y.squeeze(-2)


    def _every_expert(self, x: mx.array, indices: mx.array) -> mx.array:
        """Every expert on every token (float weights), then each token's k outputs [..., k, D]."""
        E, hidden, D = self.gate_proj.weight.shape
        h = x.reshape(-1, D)  # [N, D]

        def every(proj: SwitchLinear) -> mx.array:  # [N, E, hidden]: one [N, D] x [D, E * hidden] product
            return (h @ proj.weight.reshape(E * hidden, D).T).reshape(-1, E, hidden)

        a = nn.silu(every(self.gate_proj)) * every(self.up_proj)
        y = (a.swapaxes(0, 1) @ self.down_proj.weight.swapaxes(1, 2)).swapaxes(0, 1)  # [N, E, D]
        k = indices.shape[-1]
        return mx.take_along_axis(y, indices.reshape(-1, k, 1), axis=1).reshape(*indices.shape, D)


class SparseMoE(nn.Module):
    """The Mixtral block: router (`gate`) and stacked experts (`switch_mlp`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.n_experts_per_tok
        self.group = None  # tensor parallel (shard.shard_experts): this rank holds 1/N of each expert
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.dim, args.hidden_dim, args.n_experts)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(the k experts of each token [..., k], their weights [..., k])."""
        logits = self.gate(x)
        experts = mx.stop_gradient(mx.argpartition(-logits, kth=self.k - 1, axis=-1)[..., :self.k])
        chosen = mx.take_along_axis(logits, experts, axis=-1)
        return experts, mx.softmax(chosen.astype(mx.float32), axis=-1).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        y = (self.switch_mlp(x, experts) * weights[..., None]).sum(axis=-2)
        return y if self.group is None else mx.distributed.all_sum(y, group=self.group)


# A checkpoint's per-expert tensors (HF's and, renamed, the original layout's): w1 = gate, w2 = down, w3 = up.
EXPERT_TENSOR = re.compile(r"(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.weight")
EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def stack_experts(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Per-expert tensors -> one stacked [E, out, in] tensor per layer and projection, in place
    (lazily: each is read when its layer is evaluated). A missing, extra or misshapen expert
    tensor is one error naming it; a dense model's are left for check_weights to refuse."""
    if not args.moe:
        return weights
    found: dict[tuple[str, str], dict[int, mx.array]] = {}
    for name in [n for n in weights if EXPERT_TENSOR.fullmatch(n)]:
        prefix, e, w = EXPERT_TENSOR.fullmatch(name).groups()
        found.setdefault((prefix, w), {})[int(e)] = weights.pop(name)
    for (prefix, w), experts in sorted(found.items()):  # a deterministic first error
        name = f"{prefix}.experts.{{}}.{w}.weight"
        extra = [e for e in experts if e >= args.n_experts]
        if extra:
            raise MistralError(f"checkpoint: unexpected tensor '{name.format(extra[0])}' "
                               f"(num_local_experts is {args.n_experts})")
        missing = [e for e in range(args.n_experts) if e not in experts]
        if missing:
            raise MistralError(f"checkpoint: missing tensor '{name.format(missing[0])}'")
        for e in range(1, args.n_experts):
            if experts[e].shape != experts[0].shape:
                raise MistralError(f"checkpoint: tensor '{name.format(e)}' has shape {tuple(experts[e].shape)}, "
                                   f"expert 0's is {tuple(experts[0].shape)}")
        weights[f"{prefix}.switch_mlp.{EXPERT_PROJ[w]}.weight"] = mx.stack([experts[e] for e in range(args.n_experts)])
    return weights
