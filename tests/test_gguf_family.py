"""GGUF files of the rest of the family as llama.cpp itself writes them: its convert_hf_to_gguf.py
run on tiny transformers-written checkpoints (Mixtral: `llama` with llama.expert_count and
stacked experts; Ministral 3: `mistral3` with YaRN and the llama-4 temperature), against
transformers' logits on the same checkpoint; and the keys that are refused."""

import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import TOKENIZER_V3, tiny_config
from family_checkpoints import write_ministral3, yarn
from llama_cpp_convert import convert_to_gguf
from mlx_mistral import MistralError, load
from mlx_mistral.loading import build_model, dequantized, read_gguf
from mlx_mistral.tokenizer import Tokenizer
from test_gguf import tiny_gguf
from test_model import run_chunks
from test_moe import write_mixtral

IDS = np.random.default_rng(0).integers(3, 32000, 40).tolist()  # past Ministral 3's original context of 16
CHUNKS = {"prefill": [10_000], "chunks": [7, 16], "token by token": [1]}


def converted(tmp_path_factory, name: str, write, outtype: str = "f32"):
    """(GGUF by llama.cpp's converter, transformers' model) of a checkpoint with Mistral's V3 vocabulary."""
    src = tmp_path_factory.mktemp(name)
    hf = write(src)
    shutil.copy(TOKENIZER_V3, src / "tokenizer.model")
    return convert_to_gguf(src, src.parent / f"{name}-{outtype}.gguf", outtype), hf


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    config = tiny_config(sliding_window=None, num_local_experts=4, num_experts_per_tok=2)
    return converted(tmp_path_factory, "mixtral", lambda p: write_mixtral(p, config))


@pytest.fixture(scope="module")
def ministral3(tmp_path_factory):
    return converted(tmp_path_factory, "ministral3", lambda p: write_ministral3(p, yarn()))


def oracle(hf) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([IDS])).logits[0].float().numpy()


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("family", ["mixtral", "ministral3"])
def test_llama_cpp_files_of_the_family_equal_transformers(request, family, chunks):
    path, hf = request.getfixturevalue(family)
    model, tokenizer = load(str(path), dtype=mx.float32)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.version == "v3"
    args = model.args
    if family == "mixtral":
        assert (args.n_experts, args.n_experts_per_tok, args.yarn) == (4, 2, None)
    else:
        assert (args.yarn.factor, args.yarn.original_max_position_embeddings, args.query_scaling.beta) == \
            (32.0, 16, pytest.approx(0.1))
    expected = oracle(hf)
    assert np.abs(run_chunks(model, IDS, chunks) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_q8_0_mixtral_keeps_its_experts_quantized_as_stored(tmp_path_factory):
    """llama.cpp's q8_0: 3-D expert tensors stay Q8_0 (MLX 8-bit, group 32) and compute exactly
    the file's weights: our logits equal those of the same weights dequantized."""
    config = tiny_config(sliding_window=None, num_local_experts=4, num_experts_per_tok=2, hidden_size=128,
                         intermediate_size=256, head_dim=32)
    path, _ = converted(tmp_path_factory, "mixtral-q8", lambda p: write_mixtral(p, config), "q8_0")
    args, stored, _ = read_gguf(path)
    model = build_model(args, dict(stored), mx.float32)
    experts = model.model.layers[0].block_sparse_moe.switch_mlp.gate_proj
    assert (experts.bits, experts.group_size, experts.weight.shape[0]) == (8, 32, 4)
    reference = build_model(*dequantized(args, dict(stored)), mx.float32)
    ours, ref = run_chunks(model, IDS, [7]), run_chunks(reference, IDS, [7])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("arch,extra,tensors,message", [
    ("llama", {"llama.rope.scaling.type": "yarn"}, None, "llama.rope.scaling.type 'yarn' is not supported (only none)"),
    ("mistral3", {"mistral3.rope.scaling.type": "linear"}, None, "'linear' is not supported (none or yarn)"),
    ("mistral3", {"mistral3.rope.scaling.attn_factor": 0.5}, None, "mistral3.rope.scaling.attn_factor must be 1.0"),
    ("mistral3", {"mistral3.attention.temperature_scale": 0.1}, None, "needs mistral3.rope.scaling.original_context_length"),
    ("llama", {}, {"rope_freqs.weight": np.full(2, 4.0, np.float32)}, "holds RoPE frequency factors"),
])
def test_gguf_rope_keys_we_do_not_run_are_refused(tmp_path, arch, extra, tensors, message):
    path = tiny_gguf(tmp_path / "x.gguf", arch, extra, tensors)
    with pytest.raises(MistralError, match=re.escape(message)):
        read_gguf(path)


def test_rope_freqs_of_ones_change_nothing(tmp_path):
    plain = read_gguf(tiny_gguf(tmp_path / "plain.gguf"))
    ones = read_gguf(tiny_gguf(tmp_path / "ones.gguf", tensors={"rope_freqs.weight": np.ones(2, np.float32)}))
    assert plain[0] == ones[0] and plain[1].keys() == ones[1].keys()
