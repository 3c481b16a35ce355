"""RoPE settings beyond the default: YaRN frequencies and the llama-4 query temperature.

Both are read from either layout (config.json `rope_parameters` / `rope_scaling`, params.json
`yarn` / `llama_4_scaling`) into frozen dataclasses that ModelArgs holds, and computed as
transformers 5.25 computes them (`_compute_yarn_parameters`, `Ministral3Attention`).
"""

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MistralError


@dataclass(frozen=True)
class Yarn:
    """YaRN as transformers' rope_parameters spell it (the values given, not derived ones)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # None: from factor, mscale and mscale_all_dim
    truncate: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value, optional = getattr(self, f.name), f.default is None
            if f.name == "truncate":
                ok = isinstance(value, bool)
            elif f.name == "original_max_position_embeddings":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            else:
                ok = (value is None and optional) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (value > 0 or (optional and value >= 0)))
            if not ok:
                raise MistralError(f"config: yarn {f.name} must be a {_kind(f.name)}, got {value!r}")

    @property
    def magnitude(self) -> float:
        """transformers' attention_factor: cos and sin (so q and k) are multiplied by it."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _mscale(self.factor, self.mscale) / _mscale(self.factor, self.mscale_all_dim)
        return _mscale(self.factor)

    def periods(self, head_dim: int, theta: float) -> mx.array:
        """1 / inv_freq, in float32 as torch computes it: the `freqs` of mx.fast.rope."""
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) \
                / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if low == high else high  # transformers' guard against 0 / 0
        pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
        extrapolation = 1 - np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        inv_freq = (1 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
        return mx.array((1 / inv_freq.astype(np.float32)).astype(np.float32))


@dataclass(frozen=True)
class QueryScaling:
    """llama-4 temperature: queries times 1 + beta * ln(1 + floor(pos / original_max_position_embeddings))."""

    beta: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        b, n = self.beta, self.original_max_position_embeddings
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b < 0:
            raise MistralError(f"config: llama_4_scaling_beta must be a number >= 0, got {b!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise MistralError(
                f"config: llama-4 scaling original_max_position_embeddings must be a positive integer, got {n!r}"
            )

    def __call__(self, offset: int | mx.array, length: int) -> mx.array:
        """The factor at absolute positions offset.. (one offset per row: [B]) -> [B or 1, 1, L, 1]."""
        offset = offset[:, None] if isinstance(offset, mx.array) else offset
        pos = (mx.arange(length) + offset).reshape(-1, 1, length, 1)
        return 1 + self.beta * mx.log(1 + mx.floor(pos / self.original_max_position_embeddings))


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _kind(name: str) -> str:
    return {"truncate": "boolean", "original_max_position_embeddings": "positive integer"}.get(
        name, "number >= 0 or null" if name in ("mscale", "mscale_all_dim", "attention_factor") else "positive number")


class RoPE(nn.Module):
    """Half-split rotary embedding at absolute positions: plain (base theta) or YaRN periods."""

    def __init__(self, head_dim: int, theta: float, yarn: Yarn | None):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._periods = yarn.periods(head_dim, theta) if yarn else None  # private: not a parameter

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        if self._periods is None:
            return mx.fast.rope(x, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=offset)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._periods)


# rope_parameters / rope_scaling keys (config.json) and what they set.
YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"}
HARMLESS_ROPE_KEYS = {"rope_type", "type", "rope_theta", "max_position_embeddings"}


def rope_from_hf(rope: dict[str, Any], model_type: str, max_positions: int,
                 where: str = "config.json: rope_parameters") -> tuple[Yarn | None, QueryScaling | None]:
    """(YaRN, llama-4 temperature) of a config.json's rope_parameters (or rope_scaling: `where`)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise MistralError(f"{where}.rope_type {kind!r} is not supported (only 'default' and 'yarn')")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise MistralError(f"{where}.partial_rotary_factor {rope['partial_rotary_factor']!r} "
                           "is not supported (only 1.0)")
    allowed = HARMLESS_ROPE_KEYS | {"partial_rotary_factor"} | (YARN_KEYS if kind == "yarn" else set())
    if model_type == "ministral3":
        allowed |= {"llama_4_scaling_beta", "original_max_position_embeddings"}
    unknown = sorted(set(rope) - allowed)
    if unknown:
        extra = " (transformers' mistral ignores it: use model_type 'ministral3')" \
            if unknown[0] == "llama_4_scaling_beta" else ""
        raise MistralError(f"{where}.{unknown[0]} is not supported with rope_type {kind!r} "
                           f"and model_type {model_type!r}{extra}")
    yarn = None
    if kind == "yarn":
        if "original_max_position_embeddings" not in rope:
            raise MistralError(f"{where}: yarn needs original_max_position_embeddings")
        given = {k: rope[k] for k in YARN_KEYS if k in rope}
        if given.get("factor") is None:  # transformers: the context extension ratio
            given["factor"] = max_positions / given["original_max_position_embeddings"]
        for k in ("beta_fast", "beta_slow"):  # transformers: `or 32`, `or 1`
            if not given.get(k):
                given.pop(k, None)
        yarn = Yarn(**given)
    beta = rope.get("llama_4_scaling_beta")
    scaling = None if beta is None or beta == 0 else QueryScaling(beta, rope.get("original_max_position_embeddings"))
    return yarn, scaling


def rope_from_params(params: dict[str, Any]) -> tuple[Yarn | None, QueryScaling | None]:
    """params.json `yarn` {factor, original_max_position_embeddings, beta, alpha, apply_scale} and
    `llama_4_scaling` {beta, original_max_position_embeddings}, mapped as transformers' and vLLM's
    converters do: beta -> beta_fast, alpha -> beta_slow; apply_scale false -> mscale = mscale_all_dim = 1
    (magnitude 1; transformers' spelling, which mlx-lm also reads, where it ignores attention_factor)."""
    yarn, llama4 = params.get("yarn"), params.get("llama_4_scaling")
    for name, value, keys in (("yarn", yarn, {"factor", "original_max_position_embeddings", "beta", "alpha",
                                              "apply_scale"}),
                              ("llama_4_scaling", llama4, {"beta", "original_max_position_embeddings"})):
        if value is not None and not isinstance(value, dict):
            raise MistralError(f"params.json: {name} must be an object, got {value!r}")
        unknown = sorted(set(value or {}) - keys)
        if unknown:
            raise MistralError(f"params.json: {name}.{unknown[0]} is not supported")
    out_yarn = out_scaling = None
    if yarn:
        if "factor" not in yarn or "original_max_position_embeddings" not in yarn:
            raise MistralError("params.json: yarn needs factor and original_max_position_embeddings")
        apply_scale = yarn.get("apply_scale", True)
        if not isinstance(apply_scale, bool):
            raise MistralError(f"params.json: yarn.apply_scale must be true or false, got {apply_scale!r}")
        out_yarn = Yarn(factor=yarn["factor"], original_max_position_embeddings=yarn["original_max_position_embeddings"],
                        beta_fast=yarn.get("beta", 32.0), beta_slow=yarn.get("alpha", 1.0),
                        mscale=None if apply_scale else 1.0, mscale_all_dim=None if apply_scale else 1.0)
    if llama4:
        if "beta" not in llama4 or "original_max_position_embeddings" not in llama4:
            raise MistralError("params.json: llama_4_scaling needs beta and original_max_position_embeddings")
        out_scaling = QueryScaling(llama4["beta"], llama4["original_max_position_embeddings"])
    return out_yarn, out_scaling


def rope_to_hf(theta: float, yarn: Yarn | None, scaling: QueryScaling | None) -> dict[str, Any]:
    """transformers 5 / mlx-lm `ministral3` rope_parameters for these settings."""
    out: dict[str, Any] = {"rope_type": "yarn" if yarn else "default", "rope_theta": theta}
    if yarn:
        out.update({f.name: getattr(yarn, f.name) for f in fields(yarn) if getattr(yarn, f.name) is not None})
    if scaling:
        if yarn and yarn.original_max_position_embeddings != scaling.original_max_position_embeddings:
            raise MistralError("config: a config.json has one original_max_position_embeddings for YaRN and the "
                               f"llama-4 scaling, these differ ({yarn.original_max_position_embeddings} and "
                               f"{scaling.original_max_position_embeddings})")
        out["llama_4_scaling_beta"] = scaling.beta
        out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return out


def half_split_rows(w: mx.array, heads: int, what: str) -> mx.array:
    """q/k projection rows for interleaved RoPE (adjacent pairs: Meta's original layout, which
    original Mistral checkpoints and llama.cpp's GGUF files hold) -> the half-split rows of
    nn.RoPE(traditional=False), per head. Rows are permuted whole, so a quantized weight's scales
    and biases take the same permutation exactly. `what` names the tensor in the error."""
    rows, cols = w.shape
    if rows % (2 * heads):
        raise MistralError(f"{what} has {rows} rows, not a multiple of 2 x {heads} heads")
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
