"""GGUF files (llama.cpp, Ollama, LM Studio downloads) -> ModelArgs and HF-named weights.

MLX reads GGUF itself (`mx.load(..., return_metadata=True)`): Q4_0, Q4_1 and Q8_0 tensors come
back as MLX's affine quantized triples (weight uint32, scales, biases; group 32), exactly as
stored, and F32/F16 as arrays. A file holding any other type (BF16, K-quants, ...) is read by
gguf_blocks.py, into the same form. The metadata keys and tensor names are the `gguf` package's
constants (llama.cpp's own), never guessed. Every `{arch}.*` key is read, known harmless, or
refused by name.

RoPE layout: llama.cpp's converter permutes the q/k rows of a Hugging Face checkpoint so that
its rotation of adjacent pairs (GPT-J style, Meta's original layout) computes what the HF
half-split rotation does. Our model runs the HF layout (nn.RoPE(traditional=False)), so the rows
are permuted back, per head, exactly as an original Mistral checkpoint's wq/wk are. The rows of
a quantized weight are quantized independently (groups run along the input dimension), so the
same row permutation of its weight, scales and biases is exact.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx

from ..config import ModelArgs, Quantization, packed_bits
from ..errors import MistralError
from ..rope import QueryScaling, Yarn, half_split_rows
from .gguf_blocks import GROUP, MLX_READS, read_with_gguf, tensor_types, unreadable

# llama: Mistral 7B, NeMo, Small, Codestral, SmolLM2, and Mixtral (with llama.expert_count);
# mistral3: what llama.cpp writes for Ministral 3 / Devstral 2 (YaRN, llama-4 temperature) and the
# text of Mistral Small 3.x. Others are refused.
ARCHITECTURES = ("llama", "mistral3")
K = gguf.Keys
# {arch}.* keys we implement (-> ModelArgs) and those that do not change the computation.
ARCH_KEYS = {
    K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.BLOCK_COUNT, K.LLM.FEED_FORWARD_LENGTH,
    K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV, K.Attention.LAYERNORM_RMS_EPS, K.Rope.FREQ_BASE,
    K.Rope.DIMENSION_COUNT, K.Attention.KEY_LENGTH, K.Attention.VALUE_LENGTH, K.LLM.VOCAB_SIZE,
    K.Attention.SLIDING_WINDOW, K.Rope.SCALING_TYPE, K.LLM.EXPERT_COUNT, K.LLM.EXPERT_USED_COUNT,
}
# mistral3's YaRN and temperature, as llama.cpp's src/models/mistral3.cpp reads them
YARN_KEYS = {
    K.Rope.SCALING_FACTOR, K.Rope.SCALING_ORIG_CTX_LEN, K.Rope.SCALING_YARN_BETA_FAST, K.Rope.SCALING_YARN_BETA_SLOW,
    K.Rope.SCALING_YARN_LOG_MUL, K.Rope.SCALING_ATTN_FACTOR, K.Attention.TEMPERATURE_SCALE,
}
MT = gguf.MODEL_TENSOR
# GGUF tensor -> our (Hugging Face) name; "{bid}" is the block index.
TENSORS = {
    MT.TOKEN_EMBD: "model.embed_tokens", MT.OUTPUT_NORM: "model.norm", MT.OUTPUT: "lm_head",
    MT.ATTN_NORM: "model.layers.{bid}.input_layernorm", MT.FFN_NORM: "model.layers.{bid}.post_attention_layernorm",
    MT.ATTN_Q: "model.layers.{bid}.self_attn.q_proj", MT.ATTN_K: "model.layers.{bid}.self_attn.k_proj",
    MT.ATTN_V: "model.layers.{bid}.self_attn.v_proj", MT.ATTN_OUT: "model.layers.{bid}.self_attn.o_proj",
    MT.FFN_GATE: "model.layers.{bid}.mlp.gate_proj", MT.FFN_UP: "model.layers.{bid}.mlp.up_proj",
    MT.FFN_DOWN: "model.layers.{bid}.mlp.down_proj",
    # Mixtral: the router, and each projection's experts stacked [experts, out, in] (llama.cpp's merge)
    MT.FFN_GATE_INP: "model.layers.{bid}.block_sparse_moe.gate",
    MT.FFN_GATE_EXP: "model.layers.{bid}.block_sparse_moe.switch_mlp.gate_proj",
    MT.FFN_UP_EXP: "model.layers.{bid}.block_sparse_moe.switch_mlp.up_proj",
    MT.FFN_DOWN_EXP: "model.layers.{bid}.block_sparse_moe.switch_mlp.down_proj",
}


def read_gguf(path: Path, bits: int | None = None) -> tuple[ModelArgs, dict[str, mx.array], dict[str, Any]]:
    """(args, HF-named weights, the file's metadata) of a GGUF file. Tensors of types MLX does
    not read (K-quants, IQ, Q5) are requantized to `bits` (gguf_blocks.read_with_gguf)."""
    if bits not in (None, 4, 8, 16):
        raise MistralError(f"gguf_bits must be 4, 8 or 16, got {bits!r}")
    tensors, meta = _load(path, bits)
    arch = meta.get(K.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise MistralError(f"{path}: general.architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    args = _args(path, arch, meta, tensors)
    return args, _weights(path, arch, args, tensors), meta


def _load(path: Path, bits: int | None) -> tuple[dict[str, mx.array], dict[str, Any]]:
    if not path.is_file():
        raise MistralError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MistralError(f"{path}: not a GGUF file (its first bytes are not the GGUF magic)")
    if any(t not in MLX_READS for t in tensor_types(path).values()):
        return read_with_gguf(path, bits)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:  # truncated, a corrupt header
        raise unreadable(path, e) from None
    meta = {k: (v.item() if isinstance(v, mx.array) and v.size == 1 else v) for k, v in meta.items()}
    return tensors, meta


def _args(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, mx.array]) -> ModelArgs:
    known = {k.format(arch=arch) for k in ARCH_KEYS | (YARN_KEYS if arch == "mistral3" else set())}
    for key in sorted(k for k in meta if k.startswith(f"{arch}.")):
        if key not in known:
            raise MistralError(f"{path}: unknown metadata key {key!r} (it may change the computation; refused)")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        name = key.format(arch=arch)
        if required and name not in meta:
            raise MistralError(f"{path}: missing metadata key {name!r}")
        return meta.get(name, default)

    dim, n_heads = get(K.LLM.EMBEDDING_LENGTH, required=True), get(K.Attention.HEAD_COUNT, required=True)
    head_dim = get(K.Attention.KEY_LENGTH) or (dim // n_heads if isinstance(dim, int) and n_heads else 0)
    for key in (K.Attention.VALUE_LENGTH, K.Rope.DIMENSION_COUNT):
        if get(key, head_dim) != head_dim:  # partial rotary or v heads of another width: not this model
            raise MistralError(f"{path}: {key.format(arch=arch)} must equal the head dimension ({head_dim}), "
                               f"got {get(key)!r}")
    embed = tensors.get("token_embd.weight")
    vocab = get(K.LLM.VOCAB_SIZE) or (embed.shape[0] if embed is not None else 0)
    return ModelArgs(
        dim=dim, n_layers=get(K.LLM.BLOCK_COUNT, required=True), n_heads=n_heads,
        n_kv_heads=get(K.Attention.HEAD_COUNT_KV, n_heads), head_dim=head_dim,
        hidden_dim=get(K.LLM.FEED_FORWARD_LENGTH, required=True), vocab_size=vocab,
        norm_eps=get(K.Attention.LAYERNORM_RMS_EPS, 1e-5), rope_theta=get(K.Rope.FREQ_BASE, 10000.0),
        sliding_window=get(K.Attention.SLIDING_WINDOW) or None,
        max_position_embeddings=get(K.LLM.CONTEXT_LENGTH, 32768),
        tie_word_embeddings="output.weight" not in tensors,
        quantization=_quantization(tensors),
        n_experts=get(K.LLM.EXPERT_COUNT, 0), n_experts_per_tok=get(K.LLM.EXPERT_USED_COUNT, 0),
        **_rope_scaling(path, arch, get),
    )


def _rope_scaling(path: Path, arch: str, get: Callable[..., Any]) -> dict[str, Any]:
    """YaRN and the llama-4 temperature as llama.cpp computes them for mistral3
    (src/llama-context.cpp, src/models/mistral3.cpp): yarn_log_multiplier is transformers'
    mscale_all_dim with mscale 1 (0 or absent: the attention factor 0.1 ln(factor) + 1, as
    transformers' without either); the temperature 1 + scale * ln(1 + floor(pos / the original
    context)), transformers' llama_4_scaling_beta."""
    scaling = get(K.Rope.SCALING_TYPE, "none")
    if scaling not in ("none", "yarn") or (scaling == "yarn" and arch != "mistral3"):
        raise MistralError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported "
                           f"({'none or yarn' if arch == 'mistral3' else 'only none'})")
    if get(K.Rope.SCALING_ATTN_FACTOR, 1.0) != 1.0:
        raise MistralError(f"{path}: {arch}.rope.scaling.attn_factor must be 1.0, got {get(K.Rope.SCALING_ATTN_FACTOR)!r}")
    original, beta = get(K.Rope.SCALING_ORIG_CTX_LEN), get(K.Attention.TEMPERATURE_SCALE, 0.0)
    out: dict[str, Any] = {}
    if scaling == "yarn":
        log_mul = get(K.Rope.SCALING_YARN_LOG_MUL, 0.0)
        out["yarn"] = Yarn(get(K.Rope.SCALING_FACTOR, required=True), get(K.Rope.SCALING_ORIG_CTX_LEN, required=True),
                           beta_fast=get(K.Rope.SCALING_YARN_BETA_FAST, 32.0),
                           beta_slow=get(K.Rope.SCALING_YARN_BETA_SLOW, 1.0),
                           mscale=1.0 if log_mul else None, mscale_all_dim=log_mul or None)
    if beta:
        if not original:
            raise MistralError(f"{path}: {arch}.attention.temperature_scale needs {arch}.rope.scaling.original_context_length")
        out["query_scaling"] = QueryScaling(float(beta), original)
    return out


def _quantization(tensors: dict[str, mx.array]) -> Quantization | None:
    """The file's most common quantization (group 32; bits from the packed width). Tensors of
    another width (a Q4_1 file's Q8_0 embedding) keep theirs: build_model reads each one's."""
    widths = [packed_bits(tensors[n.removesuffix(".scales") + ".weight"], w, GROUP)
              for n, w in tensors.items() if n.endswith(".scales")]
    return Quantization(group_size=GROUP, bits=max(set(widths), key=widths.count)) if widths else None


def _weights(path: Path, arch: str, args: ModelArgs, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    names = {}
    for tensor, ours in TENSORS.items():
        for bid in range(args.n_layers if "{bid}" in gguf.TENSOR_NAMES[tensor] else 1):
            names[gguf.TENSOR_NAMES[tensor].format(bid=bid)] = (tensor, ours.format(bid=bid))
    out = {}
    for name, w in tensors.items():
        stem, _, part = name.rpartition(".")
        if stem == gguf.TENSOR_NAMES[MT.ROPE_FREQS]:  # llama.cpp divides each RoPE frequency by its factor
            if not mx.all(w == 1).item():
                raise MistralError(f"{path}: tensor {name!r} holds RoPE frequency factors (Llama 3's scaling), "
                                   "which are not supported")
            continue
        if stem not in names or part not in ("weight", "scales", "biases"):
            raise MistralError(f"{path}: unexpected tensor {name!r} for a {arch} model of {args.n_layers} blocks")
        tensor, ours = names[stem]
        if tensor in (MT.ATTN_Q, MT.ATTN_K):
            heads = args.n_heads if tensor == MT.ATTN_Q else args.n_kv_heads
            w = half_split_rows(w, heads, f"{path}: tensor {name!r}")
        out[f"{ours}.{part}"] = w
    return out
