"""python -m mlx_mistral.models: the Mistral families mlx-mistral runs, their configs, and the
memory each needs at 4 bits with the Macs it fits.

Shapes from the published config.json / params.json files (notes/mistral-family.md); the bytes
are memory.py's arithmetic: 4-bit weights (group 64, every Linear and the embedding) plus an
fp16 KV cache for one sequence, held by the rolling buffer when the model has a window.
"""

import argparse
import sys
from dataclasses import dataclass

from .config import ModelArgs
from .memory import MINISTRAL_8B, MODELS, USABLE, kv_bytes, macs_that_fit, weight_bytes
from .rope import QueryScaling, Yarn

CONTEXTS = (8192, 32768)


@dataclass(frozen=True)
class Family:
    name: str
    args: ModelArgs
    architecture: str = "mistral"  # what loads it (config.json model_type, or what it needs)

    def weight_bytes(self) -> int:
        """Weights at 4 bits (memory.weight_bytes)."""
        return weight_bytes(self.args, bits=4)

    def total_bytes(self, tokens: int) -> int:
        """4-bit weights plus one sequence's fp16 KV cache of `tokens` (each layer's window at most)."""
        return self.weight_bytes() + kv_bytes(self.args, tokens)["gqa_rolling"]


def _args(dim: int, layers: int, hidden: int, vocab: int, theta: float, heads: int = 32, window: int | None = None,
          tied: bool = False, **rope) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=8, head_dim=128, hidden_dim=hidden,
                     vocab_size=vocab, rope_theta=theta, sliding_window=window, tie_word_embeddings=tied, **rope)


def _ministral3(factor: float, original: int) -> dict:
    """Ministral 3's RoPE: YaRN (beta 32/1, mscale 1/1) and the llama-4 query temperature (beta 0.1)."""
    return dict(yarn=Yarn(factor, original, mscale=1.0, mscale_all_dim=1.0), query_scaling=QueryScaling(0.1, original))


SMALL_3 = _args(5120, 40, 32768, 131072, 1e8)
SMALL_31 = _args(5120, 40, 32768, 131072, 1e9)
FAMILIES = [
    Family("Mistral 7B v0.1", _args(4096, 32, 14336, 32000, 1e4, window=4096)),
    Family("Mistral 7B v0.2", _args(4096, 32, 14336, 32000, 1e6)),
    Family("Mistral 7B v0.3, Mathstral 7B", _args(4096, 32, 14336, 32768, 1e6)),
    Family("Codestral 22B v0.1", _args(6144, 56, 16384, 32768, 1e6, heads=48)),
    Family("Mistral NeMo 12B (2407)", _args(5120, 40, 14336, 131072, 1e6)),
    Family("Mistral Small 22B (2409)", _args(6144, 56, 16384, 32768, 1e6, heads=48)),
    Family("Mistral Small 3 24B (2501)", SMALL_3),
    Family("Magistral / Devstral Small 1.x 24B (text)", SMALL_31),
    Family("Mistral Large 2 / 2.1 123B", _args(12288, 88, 28672, 32768, 1e6, heads=96)),
    Family("Mistral Small 3.1 / 3.2 24B (text)", SMALL_31, "mistral3 wrapper"),
    Family("Magistral Small 1.2 24B (text)", SMALL_31, "mistral3 wrapper"),
    Family("Ministral 3 8B (2512)", _args(4096, 34, 14336, 131072, 1e6, **_ministral3(16.0, 16384)),
           "mistral3 wrapper + ministral3"),
    Family("Devstral Small 2 24B (2512)", _args(5120, 40, 32768, 131072, 1e8, **_ministral3(48.0, 8192)),
           "mistral3 wrapper + ministral3"),
    Family("Ministral 8B (2410)", MINISTRAL_8B, "per-layer windows"),
    Family("Mixtral 8x7B", MODELS["Mixtral 8x7B"], "mixtral"),
    Family("Mixtral 8x22B", MODELS["Mixtral 8x22B"], "mixtral"),
]


def smallest_mac(nbytes: int) -> int | None:
    """The smallest Mac (GB) whose GPU share (memory.USABLE) holds `nbytes`; None if none does."""
    return next(iter(macs_that_fit(nbytes)), None)


def _window(a: ModelArgs) -> str:
    if a.layer_windows:
        sliding = [w for w in a.layer_windows if w]
        return f"{max(sliding)} on {len(sliding)}/{a.n_layers}"
    return str(a.sliding_window or "-")


def _rope(a: ModelArgs) -> str:
    theta = "θ " + f"{a.rope_theta:.0e}".replace("e+0", "e")
    return f"YaRN x{a.yarn.factor:g} ({theta})" if a.yarn else theta


def row(f: Family) -> list[str]:
    a, gib = f.args, 2**30
    macs = [smallest_mac(f.total_bytes(n)) for n in CONTEXTS]
    experts = f"{a.n_experts_per_tok} of {a.n_experts}" if a.moe else "-"
    return [f.name, str(a.n_layers), str(a.dim), f"{a.n_heads}/{a.n_kv_heads}", _window(a), str(a.vocab_size),
            _rope(a), experts, f"{f.weight_bytes() / gib:.1f}", *(f"{f.total_bytes(n) / gib:.1f}" for n in CONTEXTS),
            " / ".join(f"{m} GB" if m else "none" for m in macs), f.architecture]


HEADER = ["model", "layers", "dim", "heads/kv", "window", "vocab", "rope", "experts", "4-bit GiB", "+KV 8k",
          "+KV 32k", "smallest Mac (8k / 32k)", "loads as"]


def table() -> str:
    rows = [HEADER] + [row(f) for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m mlx_mistral.models", description=__doc__.splitlines()[0]).parse_args(argv)
    print(table())
    print(f"\nGiB: 4-bit weights (group 64), then with one sequence's fp16 KV cache; a Mac's GPU may use "
          f"{USABLE:.0%} of its memory (memory.USABLE).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
