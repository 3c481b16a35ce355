"""mlx-mistral: Mistral 7B on MLX with grouped-query attention and a rolling KV cache."""

from . import _blas  # noqa: F401  (must run before the first `import mlx`)
from .cache import RollingKVCache
from .config import ModelArgs
from .errors import MistralError
from .generate import (
    GenerationResponse, batch_generate, batch_stream_generate, generate, generate_step, stream_generate,
)
from .layered_cache import make_cache
from .loading import load
from .model import Mistral
from .sample import make_sampler
from .speculative import Lookup, load_draft
from .structured import Constraint, Grammars
from .text import StreamingDetokenizer, TextTokenizer, ToolCall
from .tokenizer import Tokenizer

__all__ = [
    "Constraint", "Grammars", "GenerationResponse", "Lookup", "Mistral", "batch_generate",
    "batch_stream_generate", "MistralError", "ModelArgs", "RollingKVCache",
    "StreamingDetokenizer", "TextTokenizer", "Tokenizer", "ToolCall", "generate", "generate_step", "load",
    "load_draft", "make_cache", "make_sampler", "stream_generate",
]
