"""The built-in `demo` model: Mistral-shaped, seeded random weights, the real V1 tokenizer.

It lets the CLI, the app and the tests run on a fresh offline machine. Its text is
gibberish: the weights are random, not trained.
"""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Mistral

# Mistral 7B's tokenizer (Apache-2.0, from the mistral-common package).
TOKENIZER_V1 = Path(__file__).parent / "data" / "tokenizer.model.v1"
DEMO_ARGS = ModelArgs(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768,
    vocab_size=32000, sliding_window=64, max_position_embeddings=32768,
)
NOTICE = "demo model: random weights (output is gibberish); pass --model PATH_OR_REPO for a real one"


def demo_checkpoint(seed: int = 0) -> tuple[ModelArgs, dict[str, mx.array], Path]:
    """(args, weights, tokenizer path) of the demo model, built in memory."""
    mx.random.seed(seed)
    weights = {}
    for name, p in tree_flatten(Mistral(DEMO_ARGS).parameters()):
        if "norm" in name:
            weights[name] = mx.ones(p.shape)
        else:  # small enough that activations stay tame through the layers
            weights[name] = mx.random.normal(p.shape) * (0.02 if "embed" in name or "lm_head" in name else 0.05)
    return DEMO_ARGS, weights, TOKENIZER_V1
