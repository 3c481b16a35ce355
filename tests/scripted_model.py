"""A tiny Mistral checkpoint whose decoding follows a script {token: next token}.

The trick: every o_proj and down_proj is zero, so the last hidden state is RMSNorm(embedding of the
current token). Each key of the script has its own unit embedding e_slot (all other tokens share a
'default' slot); lm_head[next] = LOGIT / sqrt(hidden) * e_slot, and the default slot's row is EOS's.
RMSNorm scales e_slot by sqrt(hidden): the successor's logit is LOGIT, all others 0 (unscripted: EOS).

A token id has one successor: a scripted text must not repeat a token id with two different
successors (chain and merge raise ValueError); a chain reaching a token that is a key elsewhere
carries on with that key's successor.
"""

import shutil
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

LOGIT = 100.0  # the scripted token's logit, all others 0: a margin no temperature or penalty undoes


def chain(tokens: list[int]) -> dict[int, int]:
    """The script of a token sequence: t0 -> t1, t1 -> t2, ... (ValueError if a token recurs with
    another successor)."""
    return merge(*({a: b} for a, b in zip(tokens, tokens[1:])))


def merge(*scripts: dict[int, int]) -> dict[int, int]:
    """The union of scripts (ValueError if two give one token different successors)."""
    out: dict[int, int] = {}
    for script in scripts:
        for token, successor in script.items():
            if out.setdefault(token, successor) != successor:
                raise ValueError(f"token {token} is scripted to be followed by both {out[token]} and {successor}")
    return out


def write_scripted(path: Path, script: dict[int, int], tokenizer: Path, vocab_size: int,
                   max_position_embeddings: int = 65536, eos: int = 2, layers: int = 1) -> Path:
    """Write a scripted model (config.json and model.safetensors, float32, HF layout, no sliding
    window) and `tokenizer` (as tekken.json if it is a .json file, else tokenizer.model) to `path`;
    return `path`. `vocab_size` must be the tokenizer's (131072 for a Tekken file of write_tekken's).
    One layer by default: its prompt keys and values need no attention, so MLX's lazy prefill
    computes attention for the last token only (a 20k-token prompt in ~0.1 s on 2 CPU cores,
    where 2 layers take ~7 s)."""
    ids = [eos, *script, *script.values()]
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"script and eos ids must be integers in [0, {vocab_size})")
    hidden = max(64, -(-(len(script) + 1) // 64) * 64)  # one slot per key and the default one
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos,
        attn_implementation="eager",
    )
    model = MistralForCausalLM(config).float().eval()
    default = len(script)
    scale = LOGIT / hidden ** 0.5  # RMSNorm scales a unit vector by sqrt(hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, default] = 1.0
        head[eos, default] = scale
        for slot, (token, successor) in enumerate(script.items()):
            embed[token, default] = 0.0
            embed[token, slot] = 1.0
            head[successor, slot] = scale
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tokenizer, path / ("tekken.json" if tokenizer.suffix == ".json" else "tokenizer.model"))
    return path
