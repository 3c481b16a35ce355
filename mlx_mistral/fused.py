"""Projections of the same input fused into one matrix after loading: q/k/v, and gate/up.

Decode reads every matrix once per token; one [out_q + out_k + out_v, in] product instead of
three saves two kernel calls a layer (a launch each on Metal) and streams the weights in one
pass: on the CPU the SmolLM2 shape's products took 30.9 ms a token instead of 33.8 (measured,
docs/benchmarks.md). Each output is the same dot product of the same row of weights, so the
function is unchanged. The checkpoint's names stay the loader's: this runs on a built model.
"""

import mlx.core as mx
import mlx.nn as nn


class FusedLinear(nn.Module):
    """`linear` (an nn.Linear or nn.QuantizedLinear of the stacked rows), its output split at `cuts`."""

    def __init__(self, linear: nn.Module, cuts: list[int]):
        super().__init__()
        self.linear, self.cuts = linear, cuts

    def __call__(self, x: mx.array) -> list[mx.array]:
        return mx.split(self.linear(x), self.cuts, axis=-1)


def stacked(parts: list[nn.Module]) -> nn.Module | None:
    """One layer computing `parts` (bias-free Linears, or QuantizedLinears of one width) at once;
    None when they cannot be stacked (biases, mixed widths, sharded or swapped layers)."""
    kind = type(parts[0])
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(p) is not kind or "bias" in p for p in parts):
        return None
    rows = sum(p.weight.shape[0] for p in parts)
    if kind is nn.Linear:
        layer = nn.Linear(parts[0].weight.shape[1], rows, bias=False)  # lazy: its own init never runs
        layer.weight = mx.concatenate([p.weight for p in parts])
        return layer
    first = parts[0]
    if len({(p.group_size, p.bits, p.mode) for p in parts}) > 1:  # the mode decides whether there are biases
        return None
    layer = nn.QuantizedLinear(first.scales.shape[1] * first.group_size, rows, bias=False,
                               group_size=first.group_size, bits=first.bits, mode=first.mode)
    for key in ("weight", "scales", "biases"):
        if getattr(first, key) is not None:
            setattr(layer, key, mx.concatenate([getattr(p, key) for p in parts]))
    return layer


def fuse(module: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Replace module.<names> by module.<fused_name>, a FusedLinear, where they can be stacked."""
    parts = [getattr(module, name) for name in names]
    layer = stacked(parts)
    if layer is None:
        return
    mx.eval(layer.parameters())
    widths = [p.weight.shape[0] for p in parts]
    cuts = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
    for name in names:
        delattr(module, name)  # the separate matrices are freed as each layer is fused
    setattr(module, fused_name, FusedLinear(layer, cuts))


def fuse_projections(model: nn.Module) -> None:
    """Fuse every layer's q/k/v into `qkv` and its dense MLP's gate/up into `gate_up`, in place."""
    for block in model.model.layers:
        fuse(block.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv")
        if "mlp" in block:
            fuse(block.mlp, ("gate_proj", "up_proj"), "gate_up")
