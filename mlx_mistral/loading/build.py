"""Weights -> a model: checked strictly against the config, quantized layers each at their own
width, evaluated a layer at a time (and sharded across ranks when asked)."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs, packed_bits
from ..cpu import cpu_paths_on, prepare_for_cpu
from ..errors import MistralError
from ..fused import fuse_projections
from ..model import Mistral
from ..shard import shard


def default_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """float32 on the CPU backend (its fast dtype); else the checkpoint's float dtype."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    floats = [w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)]
    return floats[0] if floats else mx.float16


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise MistralError naming the first missing, unexpected, misshapen or mistyped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    for name in expected:
        if name not in weights:
            raise MistralError(f"checkpoint: missing tensor '{name}'")
    for name, w in weights.items():
        if name not in expected:
            raise MistralError(f"checkpoint: unexpected tensor '{name}'")
        want = expected[name]
        if w.shape != want.shape:
            raise MistralError(
                f"checkpoint: tensor '{name}' has shape {tuple(w.shape)}, config expects {tuple(want.shape)}"
            )
        if mx.issubdtype(want.dtype, mx.floating):
            if not mx.issubdtype(w.dtype, mx.floating):
                raise MistralError(f"checkpoint: tensor '{name}' has dtype {w.dtype}, expected a float dtype")
        elif w.dtype != want.dtype:
            raise MistralError(f"checkpoint: tensor '{name}' has dtype {w.dtype}, expected {want.dtype}")


def build_model(args: ModelArgs, weights: dict[str, mx.array], dtype: mx.Dtype | None = None,
                group: mx.distributed.Group | None = None) -> Mistral:
    """A model with `weights` loaded strictly (names and shapes checked) and evaluated once.

    With a `group` of several ranks, only this rank's share of each layer is kept
    (shard.shard slices the lazy weights), evaluated one layer at a time. `weights` is
    emptied: the model owns the arrays, and a full tensor must not outlive its slice.
    """
    dtype = dtype or default_dtype(weights)
    model = Mistral(args)
    if args.quantization:
        q = args.quantization
        def width(p: str, m: nn.Module) -> bool | dict:  # a layer of another width keeps it (mixed files)
            if f"{p}.scales" not in weights:
                return False
            bits = packed_bits(weights[f"{p}.weight"], weights[f"{p}.scales"], q.group_size)
            return True if bits == q.bits else {"group_size": q.group_size, "bits": bits}

        nn.quantize(model, q.group_size, q.bits, class_predicate=width)
    check_weights(model, weights)
    loaded = [(name, w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w)
              for name, w in weights.items()]
    weights.clear()
    model.load_weights(loaded, strict=True)
    del loaded
    if group is not None and group.size() > 1:
        shard(model, group)
    try:
        for layer in model.model.layers:  # a layer at a time: the transient full tensors stay small
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as e:
        raise MistralError(f"checkpoint: weights could not be read ({e})") from None
    fuse_projections(model)
    if cpu_paths_on():
        prepare_for_cpu(model)
    model.eval()
    return model


def dequantized(args: ModelArgs, weights: dict[str, mx.array]) -> tuple[ModelArgs, dict[str, mx.array]]:
    """The same function with dense float32 weights: each quantized layer dequantized at its own
    width (lazily). Quality benchmarks score quantizations this way (CPU quantized matmuls are
    slower than dense ones; the function is the same up to float32 rounding)."""
    q = args.quantization
    if q is None:
        return args, weights
    out = {}
    for name, w in weights.items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{layer}.scales" in weights:
            scales, biases = weights[f"{layer}.scales"], weights[f"{layer}.biases"]
            bits = packed_bits(w, scales, q.group_size)
            out[name] = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), q.group_size, bits)
        elif not name.endswith((".scales", ".biases")):
            out[name] = w
    return replace(args, quantization=None), out

