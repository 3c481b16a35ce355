"""Tiny random-weight Mistral checkpoints in both layouts, made with transformers."""

import json
import os
import shutil
from pathlib import Path

import mistral_common
import torch
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from safetensors.torch import save_file
from transformers import MinistralConfig, MinistralForCausalLM, MistralConfig, MistralForCausalLM

DATA = Path(os.path.dirname(mistral_common.__file__)) / "data"
TOKENIZER_V1 = DATA / "tokenizer.model.v1"
TOKENIZER_V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
TOKENIZER_TEKKEN = DATA / "tekken_240911.json"  # Mistral NeMo's


def write_tekken(path: Path, version: str, think: bool = False) -> Path:
    """A tekken.json of `version` with NeMo's vocabulary (tekken_240911.json, the newest shipped, is
    v3 and lists no special tokens). Past v7 the file must list them: mistral-common's own test
    layout (its tests/test_tekken.py: the 20 of DEPRECATED_SPECIAL_TOKENS, <SPECIAL_i> fillers,
    [ARGS] 32, [CALL_ID] 33), with `think`: [THINK] 34 and [/THINK] 35, as a reasoning model's; v15
    needs [MODEL_SETTINGS] and [/MODEL_SETTINGS] too (36 and 37: ranks chosen here, not a release's)
    and a model_settings_builder (here one that allows no settings)."""
    data = json.loads(TOKENIZER_TEKKEN.read_text(encoding="utf-8"))
    data["config"]["version"] = version
    if version not in ("v3", "v7") or think:
        named = {t["rank"]: t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
        named |= {32: "[ARGS]", 33: "[CALL_ID]"} | ({34: "[THINK]", 35: "[/THINK]"} if think else {})
        if version == "v15":
            named |= {36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]"}
            data["model_settings_builder"] = {}
        data["special_tokens"] = [{"rank": i, "token_str": str(named.get(i, f"<SPECIAL_{i}>")), "is_control": True}
                                  for i in range(max(named) + 1)]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def tiny_config(sliding_window: int | None = 8, **overrides) -> dict:
    config = dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=sliding_window,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return config


def write_hf(path: Path, config: dict, seed: int = 0, tokenizer: Path = TOKENIZER_V1) -> MistralForCausalLM:
    """Save a random MistralForCausalLM in HF layout (MinistralForCausalLM when the config has
    per-layer `layer_types`); return it (float32, eager attention)."""
    torch.manual_seed(seed)
    kind = (MinistralConfig, MinistralForCausalLM) if "layer_types" in config else (MistralConfig, MistralForCausalLM)
    model = kind[1](kind[0](**config, attn_implementation="eager")).float().eval()
    with torch.no_grad():  # larger than HF's init so that layers matter to the logits
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tokenizer, path / ("tekken.json" if tokenizer.suffix == ".json" else "tokenizer.model"))
    return model


def to_original(hf: MistralForCausalLM, path: Path, tokenizer: Path = TOKENIZER_V1) -> None:
    """Write the same weights in the original Mistral layout (params.json, interleaved RoPE)."""
    c = hf.config
    path.mkdir(parents=True, exist_ok=True)

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:  # HF half-split -> interleaved
        out, inp = w.shape
        return w.reshape(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)

    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    w = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w[f"layers.{i}.attention.wq.weight"] = unpermute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        w[f"layers.{i}.attention.wk.weight"] = unpermute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        w[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        w[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        w[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        w[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        w[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        w[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        w[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "consolidated.safetensors"))
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, head_dim=c.head_dim,
                  hidden_dim=c.intermediate_size, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                  rope_theta=c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    if getattr(c, "layer_types", None):  # one window per layer, null for full attention
        params["sliding_window"] = [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types]
    elif c.sliding_window:
        params["sliding_window"] = c.sliding_window
    (path / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, path / "tokenizer.model.v3" if "v3" in tokenizer.name else path / "tokenizer.model")


def oracle_logits(hf: MistralForCausalLM, ids: list[int], **config):
    """Full-sequence logits [L, vocab] as float32 numpy (no HF cache), in the model's dtype;
    with the HF config's attributes `config` (e.g. sliding_window) changed for this call."""
    saved = {name: getattr(hf.config, name) for name in config}
    try:
        for name, value in config.items():
            setattr(hf.config, name, value)
        with torch.no_grad():
            return hf(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    finally:
        for name, value in saved.items():
            setattr(hf.config, name, value)
