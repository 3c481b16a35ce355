"""Tiny random-weight checkpoints of the rest of the family, made with transformers: the Mistral3 /
Llava vision-language wrappers, Ministral3 (YaRN + llama-4 query temperature), FP8 weights."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlavaConfig, LlavaForConditionalGeneration, Ministral3Config, Ministral3ForCausalLM, MistralConfig,
    Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig,
)

from checkpoints import TOKENIZER_V1, tiny_config, to_original

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
              image_size=32, patch_size=8)


def yarn(orig: int = 16, **overrides) -> dict:
    """Ministral 3's rope_parameters (YaRN, llama-4 beta 0.1) over a tiny original context."""
    return {"rope_type": "yarn", "rope_theta": 1e6, "factor": 512 / orig, "original_max_position_embeddings": orig,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1, **overrides}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float32, eval, weights larger than HF's init so that layers matter to the logits."""
    torch.manual_seed(seed)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    return model


def save(model: torch.nn.Module, path: Path, tokenizer: Path = TOKENIZER_V1) -> torch.nn.Module:
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return model


def write_ministral3(path: Path, rope_parameters: dict, seed: int = 0, **overrides) -> Ministral3ForCausalLM:
    """Ministral3ForCausalLM (text only: Devstral 2's layout)."""
    config = ministral3_text(rope_parameters, **overrides)
    config._attn_implementation = "eager"
    return save(randomize(Ministral3ForCausalLM(config), seed), path)


def write_wrapper(path: Path, text_config, llava: bool = False, seed: int = 0, **outer):
    """Mistral3ForConditionalGeneration (or Llava: Pixtral 12B) over `text_config`, with a tiny Pixtral
    vision tower; returns the model (its forward with input_ids only is the text-only oracle)."""
    config_class, model_class = ((LlavaConfig, LlavaForConditionalGeneration) if llava
                                 else (Mistral3Config, Mistral3ForConditionalGeneration))
    config = config_class(vision_config=PixtralVisionConfig(**VISION), text_config=text_config, **outer)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return save(randomize(model_class(config), seed), path)


def mistral_text(**overrides) -> MistralConfig:
    return MistralConfig(**tiny_config(**overrides))


def ministral3_text(rope_parameters: dict, **overrides) -> Ministral3Config:
    config = tiny_config(**{"sliding_window": None, **overrides})
    del config["rope_theta"]  # in rope_parameters
    return Ministral3Config(**config, rope_parameters=rope_parameters)


def to_original_vision(hf: Ministral3ForCausalLM, path: Path) -> None:
    """The same text weights in Mistral's layout, as a vision-language checkpoint: params.json `yarn`,
    `llama_4_scaling` and a `vision_encoder` section, plus vision tensors that must be skipped."""
    to_original(hf, path)
    rope = hf.config.rope_parameters
    params = json.loads((path / "params.json").read_text())
    params.update(
        yarn={"factor": rope["factor"], "original_max_position_embeddings": rope["original_max_position_embeddings"],
              "beta": rope["beta_fast"], "alpha": rope["beta_slow"], "apply_scale": False},
        llama_4_scaling={"beta": rope["llama_4_scaling_beta"],
                         "original_max_position_embeddings": rope["original_max_position_embeddings"]},
        vision_encoder={"hidden_size": 32, "num_channels": 3, "image_size": 32, "patch_size": 8},
        max_position_embeddings=hf.config.max_position_embeddings,
    )
    (path / "params.json").write_text(json.dumps(params))
    weights = load_file(str(path / "consolidated.safetensors"))
    for name in ("vision_encoder.patch_conv.weight", "vision_language_adapter.w_in.weight",
                 "patch_merger.merging_layer.weight", "pre_mm_projector_norm.weight"):
        weights[name] = torch.randn(8, 4)
    save_file(weights, str(path / "consolidated.safetensors"))


def to_fp8(src: Path, fp8: Path, dequantized: Path) -> None:
    """An FP8 copy of an HF checkpoint as the official ones are (every Linear weight in
    float8_e4m3fn with a per-tensor weight_scale_inv and an activation_scale; quantization_config
    fp8), and its dequantized copy in bfloat16 (the declared dtype) for the oracle."""
    for out in (fp8, dequantized):
        shutil.copytree(src, out)
    weights = load_file(str(src / "model.safetensors"))
    quantized, plain = {}, {}
    for name, w in weights.items():
        w = w.to(torch.bfloat16)
        if name.endswith("proj.weight"):
            scale = (w.float().abs().max() / 448.0).reshape(())
            codes = (w.float() / scale).to(torch.float8_e4m3fn)
            quantized[name], plain[name] = codes, (codes.float() * scale).to(torch.bfloat16)
            quantized[name.removesuffix("weight") + "weight_scale_inv"] = scale
            quantized[name.removesuffix("weight") + "activation_scale"] = torch.tensor(1.0)
        else:
            quantized[name] = plain[name] = w
    save_file(quantized, str(fp8 / "model.safetensors"))
    save_file(plain, str(dequantized / "model.safetensors"))
    for out, extra in ((fp8, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static",
                                                       "weight_block_size": None}}), (dequantized, {})):
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, **extra, "dtype": "bfloat16"}))
