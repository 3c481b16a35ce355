"""Checkpoint directories (Hugging Face / MLX layout, or Mistral's original one) -> ModelArgs,
HF-named lazy weights and the tokenizer file.

read_checkpoint() is the one path from a directory to HF-named (lazy) weights; convert/ writes
what it returns, so the runtime and the converter never disagree on names or layouts.
"""

import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..config import ModelArgs, read_json
from ..config_keys import WRAPPER_TYPES
from ..errors import MistralError
from ..fp8 import dequantize
from ..moe import stack_experts
from .files import load_safetensors
from .original import from_original, load_original
from .vision import NATIVE_PREFIXES as ORIGINAL_VISION_PREFIXES
from .vision import PREFIXES as VISION_PREFIXES
from .vision import vision_weights

# A vision-language wrapper's tensors: its language model (published, transformers 5 and mlx-lm
# names) and the vision tower and projector we skip; the same in the original layout.
WRAPPED_NAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))


def read_config(path: Path) -> ModelArgs:
    """The ModelArgs of a checkpoint directory (config.json, else params.json)."""
    if (path / "config.json").exists():
        return ModelArgs.from_hf(read_json(path / "config.json"))
    if (path / "params.json").exists():
        return ModelArgs.from_params(read_json(path / "params.json"))
    if not path.is_dir():
        raise MistralError(f"model directory '{path}' does not exist")
    raise MistralError(f"{path}: no config.json (Hugging Face layout) or params.json (original layout)")


def read_checkpoint(path: Path) -> tuple[ModelArgs, dict[str, mx.array], Path]:
    """(args, lazy HF-named weights, tokenizer file) of a checkpoint directory.

    A vision-language checkpoint gives its text model, and its vision tower's and projector's
    tensors where args.vision says how to build them (dropped unread otherwise).
    FP8 weights come dequantized (lazily: the loader evaluates them a layer at a time)."""
    args = read_config(path)
    hf = (path / "config.json").exists()
    config = read_json(path / ("config.json" if hf else "params.json"))
    wrapped = config.get("model_type") in WRAPPER_TYPES if hf else bool(
        config.get("vision_encoder") or config.get("multimodal"))
    if hf:
        weights = {}
        for file in _hf_weight_files(path):
            weights.update(load_safetensors(file))
    else:
        weights = load_original(path)
    vision = dequantize(vision_weights(weights, args.vision)) if wrapped and args.vision else {}
    if wrapped:
        weights = _text_weights(weights, VISION_PREFIXES if hf else ORIGINAL_VISION_PREFIXES)
    weights = dequantize(weights)
    if not hf:
        weights = from_original(args, weights)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if wrapped and hf:  # transformers 5 ties by the outer flag, 4.x and mlx-lm by text_config's: the file says
        args = replace(args, tie_word_embeddings="lm_head.weight" not in weights)
    return args, {**stack_experts(args, weights), **vision}, find_tokenizer(path)


def _text_weights(weights: dict[str, mx.array], vision: tuple[str, ...]) -> dict[str, mx.array]:
    """A wrapper's language-model tensors under our names; its vision tensors dropped (never read)."""
    out = {}
    for name, w in weights.items():
        if name.startswith(vision):
            continue
        for prefix, ours in WRAPPED_NAMES:
            if name.startswith(prefix):
                name = ours + name.removeprefix(prefix)
                break
        out[name] = w
    return out


def find_tokenizer(path: Path) -> Path:
    """Mistral's own tokenizer files first: tekken.json, then the newest versioned SentencePiece
    file (tokenizer.model.v7 over .v3: its name says its version), then a bare tokenizer.model
    (whose version is guessed), then tokenizer.json (mlx-lm's)."""
    if (path / "tekken.json").exists():
        return path / "tekken.json"
    versioned = [p for p in path.glob("tokenizer.model.v*") if re.fullmatch(r"tokenizer\.model\.v\d+\w*", p.name)]
    if versioned:
        return max(versioned, key=lambda p: (int(re.search(r"\d+", p.name[17:])[0]), p.name))
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).exists():
            return path / name
    raise MistralError(f"{path}: no tokenizer.model, tekken.json or tokenizer.json")


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MistralError(f"{index}: expected a 'weight_map' object")
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise MistralError(f"{path}: no *.safetensors weight files")
    return files
