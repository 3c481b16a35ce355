"""Model arguments: one frozen dataclass, read from config.json or params.json."""

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from .config_keys import (
    HF_IGNORED, HF_ONLY, HF_TEXT_KEYS, IMAGES_UNSUPPORTED, LAYER_TYPES, PARAMS_IGNORED, PARAMS_KEYS, PARAMS_ONLY,
    TEXT_TYPES, WRAPPER_IGNORED, WRAPPER_TYPES, check_keys,
)
from .errors import MistralError
from .fp8 import check_params_quantization, check_quantization_config
from .vision import VisionArgs, native_vision_args, vision_args
from .rope import QueryScaling, Yarn, rope_from_hf, rope_from_params, rope_to_hf

@dataclass(frozen=True)
class Quantization:
    group_size: int
    bits: int


def packed_bits(weight: mx.array, scales: mx.array, group_size: int) -> int:
    """The bits per value of a quantized weight: its uint32 columns hold 32 / bits values each."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * group_size)


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # the widest layer window; None: a layer attends to everything
    # Each layer's window when they differ (None entries: full attention); None: all are sliding_window.
    layer_windows: tuple[int | None, ...] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    quantization: Quantization | None = None
    n_experts: int = 0  # Mixtral: experts per layer (0: a dense MLP)
    n_experts_per_tok: int = 0  # the k experts each token goes through
    yarn: Yarn | None = None  # None: RoPE with base rope_theta
    vision: VisionArgs | None = None  # an image model's vision tower and projector (vision.py)
    query_scaling: QueryScaling | None = None  # the llama-4 query temperature (ministral3)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MistralError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise MistralError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise MistralError(f"config: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("n_experts", "n_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MistralError(f"config: {name} must be a non-negative integer, got {value!r}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise MistralError(f"config: num_experts_per_tok must be 1 to num_local_experts ({self.n_experts}), "
                               f"got {self.n_experts_per_tok}")
        if self.head_dim % 2:
            raise MistralError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        for window in (self.sliding_window, *(self.layer_windows or ())):
            _check_window(window)
        if self.layer_windows is not None and (
            len(self.layer_windows) != self.n_layers or self.sliding_window != _widest(self.layer_windows)
        ):
            raise MistralError(f"config: layer_windows must have n_layers ({self.n_layers}) entries, the widest "
                               f"being sliding_window ({self.sliding_window}), got {self.layer_windows!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise MistralError(f"config: {name} must be a positive number, got {value!r}")
        q = self.quantization
        if q is not None and (q.bits not in (2, 3, 4, 5, 6, 8) or q.group_size not in (32, 64, 128)):
            raise MistralError(
                f"config: quantization must have bits in 2-6 or 8 and group_size 32/64/128, got {q}"
            )
        for name, kind in (("yarn", Yarn), ("query_scaling", QueryScaling)):
            if not isinstance(getattr(self, name), (kind, type(None))):
                raise MistralError(f"config: {name} must be a {kind.__name__} or None, got {getattr(self, name)!r}")

    @property
    def attention_scale(self) -> float:
        """The softmax scale: 1/sqrt(head_dim), times YaRN's magnitude squared (transformers scales
        cos and sin, so q and k, by it; folded here, the cached keys stay plain)."""
        return self.head_dim**-0.5 * (self.yarn.magnitude**2 if self.yarn else 1.0)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        return self.layer_windows or (self.sliding_window,) * self.n_layers

    @classmethod
    def from_hf(cls, config: dict[str, Any], file: str = "config.json") -> "ModelArgs":
        """From a Hugging Face / MLX `config.json` dictionary (a text model, or a vision-language
        wrapper whose text model is read)."""
        model_type = config.get("model_type")
        if model_type in WRAPPER_TYPES:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise MistralError(f"{file}: a {model_type!r} config needs a text_config object")
            check_keys(config, WRAPPER_IGNORED | {"model_type", "text_config", "quantization",
                                                   "quantization_config"}, {}, file)
            check_quantization_config(config.get("quantization_config"), config.get("quantization"), file)
            # mlx-lm writes its quantization at the outer level
            args = cls.from_hf({"quantization": config.get("quantization"), **text}, f"{file} text_config")
            return replace(args, vision=_vision(vision_args, config, file))
        if model_type not in TEXT_TYPES:
            raise MistralError(
                f"{file}: model_type must be one of {', '.join(TEXT_TYPES + WRAPPER_TYPES)}, got {model_type!r}"
            )
        check_keys(config, HF_IGNORED | HF_TEXT_KEYS, HF_ONLY, file)
        check_quantization_config(config.get("quantization_config"), config.get("quantization"), file)
        rope, where = config.get("rope_parameters") or {}, "rope_parameters"
        scaling = config.get("rope_scaling")
        for name, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if value is not None and not isinstance(value, dict):
                raise MistralError(f"{file}: {name} must be an object, got {value!r}")
        if scaling:  # transformers 4's spelling: its type overrides rope_parameters' rope_type
            rope, where = {**{k: v for k, v in rope.items() if k != "rope_type"}, **scaling}, "rope_scaling"
        if model_type == "ministral3" and not rope:  # transformers would put its own YaRN defaults in
            raise MistralError(f"{file}: a ministral3 config needs rope_parameters")
        try:
            dim, n_heads = config["hidden_size"], config["num_attention_heads"]
            args = dict(
                dim=dim,
                n_layers=config["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=config.get("num_key_value_heads", n_heads),
                head_dim=config.get("head_dim") or _div(dim, n_heads),
                hidden_dim=config["intermediate_size"],
                vocab_size=config["vocab_size"],
            )
            if config["model_type"] == "mixtral":
                args.update(n_experts=config["num_local_experts"], n_experts_per_tok=config["num_experts_per_tok"])
        except KeyError as e:
            raise MistralError(f"{file}: missing required key {e.args[0]!r}") from None
        max_positions = config.get("max_position_embeddings", 32768)
        yarn, query_scaling = rope_from_hf(rope, model_type, max_positions, f"{file}: {where}")
        return cls(
            **args,
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            **_hf_windows(config.get("sliding_window"), config.get("layer_types"), args["n_layers"]),
            max_position_embeddings=max_positions,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            quantization=_quantization(config.get("quantization")),
            yarn=yarn,
            query_scaling=query_scaling,
        )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ModelArgs":
        """From an original Mistral `params.json` dictionary."""
        moe = params.get("moe") or {}
        if not isinstance(moe, dict) or (moe and set(moe) != {"num_experts", "num_experts_per_tok"}):
            raise MistralError(f"params.json: moe must be {{'num_experts', 'num_experts_per_tok'}}, got {moe!r}")
        names = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
        missing = [n for n in names if n not in params]
        if missing:
            raise MistralError(f"params.json: missing required key {missing[0]!r}")
        check_keys(params, PARAMS_IGNORED | PARAMS_KEYS, PARAMS_ONLY, "params.json")
        multimodal = params.get("multimodal") or {}
        if not isinstance(multimodal, dict) or set(multimodal) - {"vision_encoder_args"}:
            raise MistralError("params.json: multimodal: only a vision encoder (vision_encoder_args) is "
                               f"supported (its text model is loaded), got {sorted(multimodal)}")
        vision = None
        if params.get("vision_encoder") or multimodal:
            vision = _vision(native_vision_args, params, "params.json")
        check_params_quantization(params.get("quantization"))
        yarn, query_scaling = rope_from_params(params)
        window = params.get("sliding_window")
        if isinstance(window, list):  # one entry per layer, repeated over the layers (mistral-inference)
            n = params["n_layers"]
            if not window or not isinstance(n, int) or n % len(window):
                raise MistralError(f"params.json: sliding_window has {len(window)} entries, which must divide "
                                   f"n_layers ({n!r}): the list repeats over the layers")
            windows = _per_layer(window * (n // len(window)), "params.json")
        else:
            windows = dict(sliding_window=window)
        return cls(
            **{n: params[n] for n in names},
            n_kv_heads=params.get("n_kv_heads", params["n_heads"]),
            head_dim=params.get("head_dim") or _div(params["dim"], params["n_heads"]),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            **windows,
            max_position_embeddings=params.get("max_position_embeddings", 32768),
            tie_word_embeddings=params.get("tied_embeddings", False),
            n_experts=moe.get("num_experts", 0),
            n_experts_per_tok=moe.get("num_experts_per_tok", 0),
            yarn=yarn,
            query_scaling=query_scaling,
            vision=vision,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json written by convert/ (keys mlx-lm and transformers read): `mistral`, or
        `ministral3` where YaRN or the llama-4 temperature is set."""
        config = {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.moe:
            config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                          num_local_experts=self.n_experts, num_experts_per_tok=self.n_experts_per_tok)
        if self.layer_windows:  # config.json holds one window, for the layers typed sliding_attention
            sliding = {w for w in self.layer_windows if w}
            if len(sliding) > 1:
                raise MistralError(f"config.json holds one sliding window, these layers have {sorted(sliding)}")
            config["sliding_window"] = sliding.pop()
            config["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.layer_windows]
        if self.yarn or self.query_scaling:
            if not self.moe:
                config.update(architectures=["Ministral3ForCausalLM"], model_type="ministral3")
            config["rope_parameters"] = rope_to_hf(self.rope_theta, self.yarn, self.query_scaling)
            del config["rope_theta"]
        if self.quantization:
            q = {"group_size": self.quantization.group_size, "bits": self.quantization.bits}
            config["quantization"] = config["quantization_config"] = q
        return config


def _div(dim: Any, n_heads: Any) -> Any:
    return dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) and n_heads else 0


def _check_window(window: Any, where: str = "config") -> None:
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise MistralError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")


def _widest(windows: tuple[int | None, ...]) -> int | None:
    return None if None in windows else max(windows)


def _per_layer(windows: list, where: str) -> dict[str, Any]:
    """sliding_window and layer_windows from each layer's window (read from file `where`):
    equal windows are one sliding_window (the model of a config without per-layer windows)."""
    for window in windows:
        _check_window(window, where)
    if len(set(windows)) == 1:
        return dict(sliding_window=windows[0])
    return dict(sliding_window=_widest(tuple(windows)), layer_windows=tuple(windows))


def _hf_windows(window: Any, layer_types: Any, n_layers: Any) -> dict[str, Any]:
    """config.json's sliding_window, applied to the layers layer_types calls sliding_attention."""
    if layer_types is None:
        return dict(sliding_window=window)
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise MistralError(f"config.json: layer_types must be a list of num_hidden_layers ({n_layers!r}) "
                           f"entries, got {layer_types!r}")
    unknown = [t for t in layer_types if t not in LAYER_TYPES]
    if unknown:
        raise MistralError(f"config.json: layer_types entries must be 'sliding_attention' or 'full_attention', "
                           f"got {unknown[0]!r}")
    if window is None and "sliding_attention" in layer_types:
        raise MistralError("config.json: layer_types has sliding_attention layers but sliding_window is null")
    return _per_layer([window if t == "sliding_attention" else None for t in layer_types], "config.json")


def _quantization(q: Any) -> Quantization | None:
    if q is None:
        return None
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        raise MistralError(f"config.json: quantization must be {{'group_size', 'bits'}}, got {q!r}")
    if q.get("mode", "affine") != "affine":
        raise MistralError(f"config.json: only affine quantization is supported, got {q['mode']!r}")
    return Quantization(group_size=q["group_size"], bits=q["bits"])


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MistralError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistralError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(data, dict):
        raise MistralError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _vision(read, config: dict, file: str) -> VisionArgs | None:
    """An image model's VisionArgs, or None with a warning naming why (its text model still loads)."""
    try:
        return read(config)
    except MistralError as e:
        warnings.warn(IMAGES_UNSUPPORTED.format(file) + f": {e}", stacklevel=3)
        return None
