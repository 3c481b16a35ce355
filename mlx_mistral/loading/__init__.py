"""Checkpoints -> (Mistral, tokenizer). One module per source:

    hub.py       names -> local paths: a directory, a GGUF file, a Hub repo (downloaded), "smollm2"
    hf.py        Hugging Face / MLX directories (and the original layout, through original.py)
    gguf_file.py GGUF files (llama.cpp, Ollama, LM Studio downloads); their tokenizer: gguf_tokenizer.py
    build.py     weights -> a model, checked against the config
"""

from pathlib import Path

import mlx.core as mx

from ..errors import MistralError
from ..gguf_tokenizer import gguf_tokenizer
from ..model import Mistral
from ..template_tokenizer import byte_level_json, read_tokenizer_json
from ..text import TextTokenizer
from ..tokenizer import Tokenizer
from .build import build_model, check_weights, default_dtype, dequantized
from .gguf_file import read_gguf
from .hf import find_tokenizer, read_checkpoint, read_config
from .hub import download, resolve

__all__ = ["build_model", "check_weights", "default_dtype", "dequantized", "directory_tokenizer", "download",
           "find_tokenizer", "load", "read_checkpoint", "read_config", "read_gguf", "resolve"]


def directory_tokenizer(path: Path) -> TextTokenizer:
    """A directory's tokenizer file, read: Mistral's (tokenizer.model, tekken.json, a
    SentencePiece-style tokenizer.json) by mistral-common; any other byte-level tokenizer.json
    (a LlamaForCausalLM's such as SmolLM2) with `tokenizers` and the directory's chat template."""
    if path.name == "tokenizer.json" and byte_level_json(path):
        return read_tokenizer_json(path)
    return Tokenizer(path)


def load(path_or_repo: str, dtype: mx.Dtype | None = None, group: mx.distributed.Group | None = None,
         gguf_bits: int | None = None) -> tuple[Mistral, TextTokenizer]:
    """Load a model and its tokenizer from a directory, a GGUF file (or a directory holding one),
    a Hub repo id (`org/name`, or `org/name/FILE.gguf`), "smollm2" (the installed SmolLM2 GGUF) or
    "demo" (random weights, Mistral-shaped, windowed).

    With a `group` (mlx_mistral.distributed.init()), this rank's share of the model.
    `gguf_bits` (4, 8 or 16): what a GGUF's K-quant/IQ/Q5 tensors become (MLX 4/8-bit or
    float16; default 4 for types of at most 4.5 bits a weight, else 8). Q4_0/Q4_1/Q8_0 stay as stored.
    """
    if path_or_repo == "demo":
        from ..demo import demo_checkpoint

        args, weights, tokenizer_path = demo_checkpoint()
        tokenizer = Tokenizer(tokenizer_path)
    else:
        source = resolve(path_or_repo)
        if source.suffix == ".gguf":
            args, weights, meta = read_gguf(source, gguf_bits)
            tokenizer = gguf_tokenizer(source, meta)
        else:
            args, weights, tokenizer_path = read_checkpoint(source)
            tokenizer = directory_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > args.vocab_size:
        raise MistralError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens, model vocab_size is {args.vocab_size}"
        )
    return build_model(args, weights, dtype, group), tokenizer
