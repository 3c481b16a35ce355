"""Checkpoints -> (Mistral, Tokenizer): local HF/MLX or original Mistral layout, or a Hub repo id.

read_checkpoint() is the one path from files to HF-named (lazy) weights; convert/ writes
what it returns, so the runtime and the converter never disagree on names or layouts.
"""

import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs, packed_bits, read_json
from .config_keys import WRAPPER_TYPES
from .fp8 import dequantize
from .cpu import cpu_paths_on, prepare_for_cpu
from .shard import shard
from .errors import MistralError
from .model import Mistral
from .rope import half_split_rows
from .moe import stack_experts
from .tokenizer import Tokenizer

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
WRAPPED_NAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
ORIGINAL_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_repo: str) -> Path:
    """A local directory as is; an `org/name` that is not a local path is downloaded."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MistralError(f"model '{path_or_repo}': expected a directory, found a file")
    if REPO_ID.match(path_or_repo):
        return download(path_or_repo)
    raise MistralError(f"model directory '{path_or_repo}' does not exist")


def download(repo_id: str) -> Path:
    """A Hub repo's files that load: one copy of the weights (download_files), config and tokenizer.
    Offline or unreachable, a copy downloaded before (if any)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        try:
            files = HfApi().list_repo_files(repo_id)
        except Exception:  # offline, unreachable, missing: a snapshot in the cache, if any, or its error
            return Path(snapshot_download(repo_id, local_files_only=True))
        return Path(snapshot_download(repo_id, allow_patterns=download_files(repo_id, files)))
    except MistralError:
        raise
    except Exception as e:  # network, auth, offline mode, missing repo: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(
            f"model '{repo_id}' is not a local directory and could not be downloaded from the "
            f"Hugging Face Hub (offline or unreachable? {type(e).__name__}: {reason[:200]})"
        ) from None


def download_files(repo_id: str, files: list[str]) -> list[str]:
    """The files of a repo to fetch: the top level's JSON, tokenizers and SYSTEM_PROMPT.txt, and the
    weights of one layout, the Hugging Face one (config.json + model*.safetensors) when both are
    there, else the original one (params.json + consolidated.safetensors): never both copies."""
    top = [f for f in files if "/" not in f]
    hf = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    if hf and "config.json" in top:
        weights = hf
    elif "consolidated.safetensors" in top and "params.json" in top:
        weights = ["consolidated.safetensors"]
    else:
        raise MistralError(f"model '{repo_id}': the Hub repo has no weights this loads (config.json with "
                           "*.safetensors, or params.json with consolidated.safetensors)")
    rest = [f for f in top if f.endswith(".json") or f.startswith("tokenizer.model") or f == "SYSTEM_PROMPT.txt"]
    return sorted(set(weights + rest))


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

    A vision-language checkpoint gives its text model: the vision tensors are dropped unread.
    FP8 weights come dequantized (lazily: the loader evaluates them a layer at a time)."""
    args = read_config(path)
    hf = (path / "config.json").exists()
    config = read_json(path / ("config.json" if hf else "params.json"))
    wrapped = config.get("model_type") in WRAPPER_TYPES if hf else bool(
        config.get("vision_encoder") or config.get("multimodal"))
    if hf:
        weights = {}
        for file in _hf_weight_files(path):
            weights.update(_load_safetensors(file))
    else:
        weights = _load_original(path)
    if wrapped:
        weights = _text_weights(weights, VISION_PREFIXES if hf else ORIGINAL_VISION_PREFIXES)
    weights = dequantize(weights)
    if not hf:
        weights = _from_original(args, weights)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if wrapped and hf:  # transformers 5 ties by the outer flag, 4.x and mlx-lm by text_config's: the file says
        args = replace(args, tie_word_embeddings="lm_head.weight" not in weights)
    return args, stack_experts(args, weights), find_tokenizer(path)


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


def _load_safetensors(file: Path) -> dict[str, mx.array]:
    """Lazy arrays of a safetensors file, after checking its header against its size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            arrays = mx.load(str(file))
            # mx.load gives F8_E4M3 codes as uint8 (fp8.dequantize decodes them), as it does U8 tensors
            codes = [(k, f.get_slice(k).get_dtype()) for k, w in arrays.items() if w.dtype == mx.uint8]
    except FileNotFoundError:
        raise MistralError(f"{file}: weight file not found") from None
    except Exception as e:
        raise MistralError(f"{file}: not a valid safetensors file ({e})".replace("\n", " ")) from None
    for name, dtype in codes:
        if dtype != "F8_E4M3":
            raise MistralError(f"{file}: tensor '{name}' has dtype {dtype}, expected a float dtype (8-bit: F8_E4M3)")
    return arrays


def _load_original(path: Path) -> dict[str, mx.array]:
    if (path / "consolidated.safetensors").exists():
        return _load_safetensors(path / "consolidated.safetensors")
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


def _from_original(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
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
    if cpu_paths_on():
        prepare_for_cpu(model)
    model.eval()
    return model


def load(path_or_repo: str, dtype: mx.Dtype | None = None,
         group: mx.distributed.Group | None = None) -> tuple[Mistral, Tokenizer]:
    """Load a model and its tokenizer from a directory, a Hub repo id, or "demo".

    With a `group` (mlx_mistral.distributed.init()), this rank's share of the model.
    """
    if path_or_repo == "demo":
        from .demo import demo_checkpoint

        args, weights, tokenizer_path = demo_checkpoint()
    else:
        args, weights, tokenizer_path = read_checkpoint(resolve(path_or_repo))
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > args.vocab_size:
        raise MistralError(
            f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} tokens, model vocab_size is {args.vocab_size}"
        )
    return build_model(args, weights, dtype, group), tokenizer
