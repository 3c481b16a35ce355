"""Mistral's original checkpoint layout (params.json + consolidated.safetensors or .pth): its
names -> Hugging Face names, and wq/wk rows permuted for the half-split RoPE."""

import re
from pathlib import Path

import mlx.core as mx

from ..config import ModelArgs
from ..errors import MistralError
from ..rope import half_split_rows
from .files import load_safetensors

# Original Mistral names -> Hugging Face names (the layout of every MLX checkpoint).
ORIGINAL_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
ORIGINAL_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "feed_forward.gate": "block_sparse_moe.gate",  # Mixtral's router
}
ORIGINAL_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])")  # -> block_sparse_moe.experts.E.wN
# A vision-language wrapper's tensors: its language model (published, transformers 5 and mlx-lm
# names) and the vision tower and projector we skip; the same in the original layout.


def load_original(path: Path) -> dict[str, mx.array]:
    if (path / "consolidated.safetensors").exists():
        return load_safetensors(path / "consolidated.safetensors")
    pth = sorted(path.glob("consolidated.*.pth"))
    if len(pth) != 1:
        raise MistralError(
            f"{path}: expected consolidated.safetensors or one consolidated.00.pth beside params.json"
        )
    try:
        import torch
    except ImportError:
        raise MistralError(f"{pth[0]}: reading .pth needs PyTorch: pip install torch") from None
    try:
        state = torch.load(pth[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise MistralError(f"{pth[0]}: not a readable PyTorch checkpoint ({e})") from None
    # One copy in the checkpoint's dtype (a float32 detour held 2x a bf16 model at once);
    # numpy has no bfloat16, so it travels as int16.
    return {
        k: mx.array(v.view(torch.int16).numpy()).view(mx.bfloat16) if v.dtype == torch.bfloat16
        else mx.array(v.numpy() if v.dtype == torch.float16 else v.float().numpy())
        for k, v in state.items()
    }


def from_original(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename original weights to HF names; permute wq/wk for the half-split RoPE."""
    out = {}
    for name, w in weights.items():
        stem = name.removesuffix(".weight")
        if stem in ORIGINAL_NAMES:
            out[ORIGINAL_NAMES[stem] + ".weight"] = w
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", stem)
        expert = m and ORIGINAL_EXPERT.fullmatch(m.group(2))
        if expert:
            out[f"model.layers.{m.group(1)}.block_sparse_moe.experts.{expert[1]}.{expert[2]}.weight"] = w
            continue
        if not m or m.group(2) not in ORIGINAL_LAYER_NAMES:
            raise MistralError(f"original checkpoint: unexpected tensor '{name}'")
        kind = m.group(2)
        if kind in ("attention.wq", "attention.wk") and w.ndim == 2:
            heads = args.n_heads if kind == "attention.wq" else args.n_kv_heads
            w = half_split_rows(w, heads, f"original checkpoint: {name}")
        out[f"model.layers.{m.group(1)}.{ORIGINAL_LAYER_NAMES[kind]}.weight"] = w
    return out
