"""FP8 checkpoints with per-tensor scales: checked with the config, dequantized lazily at load.

Hugging Face layout: `X.weight` in F8_E4M3 (mx.load gives its codes as uint8), `X.weight_scale_inv`
(one number, multiplied in despite its name) and `X.activation_scale` (for FP8 activations: dropped).
Mistral's layout: `X.qscale_weight` and `X.qscale_act`, the same two numbers. We compute in floats
what transformers computes with the weights dequantized (`dequantize=True`), so the activation
scheme (static or dynamic activation scales) changes nothing here. Block-wise scales are refused.
"""

from typing import Any

import mlx.core as mx

from .errors import MistralError

FP8_CONFIG_KEYS = {"quant_method", "activation_scheme", "weight_block_size", "modules_to_not_convert", "dequantize"}
WEIGHT_SCALES = (".weight_scale_inv", ".qscale_weight")
ACTIVATION_SCALES = (".activation_scale", ".qscale_act")


def check_quantization_config(qc: Any, quantization: Any, file: str) -> None:
    """A config.json's `quantization_config`: MLX's own (a copy of `quantization`) or per-tensor FP8."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise MistralError(f"{file}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method is None and quantization is not None:
        return  # mlx-lm writes its `quantization` here too; that one is read
    if method != "fp8":
        raise MistralError(f"{file}: quantization_config.quant_method {method!r} is not supported "
                           "(only 'fp8' with per-tensor scales, or MLX's `quantization`)")
    unknown = sorted(set(qc) - FP8_CONFIG_KEYS)
    if unknown:
        raise MistralError(f"{file}: quantization_config.{unknown[0]} is not supported for FP8")
    if qc.get("weight_block_size") is not None:
        raise MistralError(f"{file}: quantization_config.weight_block_size {qc['weight_block_size']!r}: "
                           "block-wise FP8 scales are not supported (only per-tensor)")
    if qc.get("activation_scheme", "static") not in ("static", "dynamic"):
        raise MistralError(f"{file}: quantization_config.activation_scheme {qc['activation_scheme']!r} is not "
                           "supported (only 'static' or 'dynamic')")


def check_params_quantization(q: Any) -> None:
    """params.json `quantization` of Mistral's FP8 checkpoints: {qformat_weight: fp8_e4m3, qscheme_act}."""
    if q is None:
        return
    if not isinstance(q, dict) or q.get("qformat_weight") != "fp8_e4m3" or set(q) - {"qformat_weight", "qscheme_act"}:
        raise MistralError(f"params.json: quantization {q!r} is not supported (only qformat_weight 'fp8_e4m3')")
    if q.get("qscheme_act", "TENSOR") not in ("TENSOR", "NO_SCALES"):
        raise MistralError(f"params.json: quantization.qscheme_act {q['qscheme_act']!r} is not supported")


def dequantize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Each FP8 weight with its per-tensor scale -> one lazy float tensor in the checkpoint's dtype
    (that of its unquantized tensors, else bfloat16): FP8 -> float32, times the scale, rounded once.
    Built lazily, so the loader evaluates it a layer at a time. Weights without scales pass as they are."""
    scales = {name.removesuffix(s) + ".weight": name for name in weights for s in WEIGHT_SCALES if name.endswith(s)}
    if not scales:
        return weights
    floats = [w.dtype for n, w in weights.items()
              if mx.issubdtype(w.dtype, mx.floating) and not n.endswith(WEIGHT_SCALES + ACTIVATION_SCALES)]
    dtype = floats[0] if floats else mx.bfloat16
    out = {}
    for name, w in weights.items():
        if name.endswith(WEIGHT_SCALES + ACTIVATION_SCALES):
            continue
        if name not in scales:
            out[name] = w
            continue
        scale = weights[scales[name]]
        if w.dtype != mx.uint8:
            raise MistralError(f"checkpoint: tensor '{name}' has an FP8 scale but dtype {w.dtype}, expected F8_E4M3")
        if scale.size != 1:
            raise MistralError(f"checkpoint: tensor '{scales[name]}' has shape {tuple(scale.shape)}: only "
                               "per-tensor FP8 scales are supported (not block-wise or per-channel)")
        out[name] = (mx.from_fp8(w, mx.float32) * scale.astype(mx.float32).reshape(())).astype(dtype)
    missing = sorted(set(scales) - set(weights))
    if missing:
        raise MistralError(f"checkpoint: tensor '{scales[missing[0]]}' has no weight '{missing[0]}'")
    return out
