"""Hugging Face LlamaForCausalLM directories (SmolLM2's architecture): a random model written by
transformers, with SmolLM2's tokenizer as transformers saves it, against transformers; convert."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from checkpoints import oracle_logits
from mlx_mistral import MistralError, load, stream_generate
from mlx_mistral.convert import convert
from mlx_mistral.config import Quantization
from mlx_mistral.template_tokenizer import TemplateTokenizer
from test_gguf import SMOLLM2, SMOLLM2_DIR
from test_gguf_tokenizer import CONVERSATION, TEXTS
from test_model import run_chunks

# GQA 3/1, head_dim 64 with 3 heads over a width of 96 (not 96 / 3), tied, SmolLM2's RoPE base
CONFIG = dict(vocab_size=49152, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=3,
              num_key_value_heads=1, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
              max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
IDS = np.random.default_rng(0).integers(17, 49152, 48).tolist()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """(directory, transformers' model): SmolLM2's config keys, its tokenizer saved by transformers."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, attn_implementation="eager")).float().eval()
    with torch.no_grad():  # larger than HF's init so that the layers matter to the logits
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    hf.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"is_llama_config": True, "rope_interleaved": False}))
    transformers.AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2.name).save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("chunks", [[10_000], [16, 5, 27], [1]], ids=["prefill", "chunks", "token by token"])
def test_llama_directory_logits_equal_transformers(llama_dir, chunks):
    path, hf = llama_dir
    model, _ = load(str(path), dtype=mx.float32)
    assert (model.args.n_heads, model.args.n_kv_heads, model.args.head_dim, model.args.sliding_window) == (3, 1, 64, None)
    expected = oracle_logits(hf, IDS)
    got = run_chunks(model, IDS, chunks)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_llama_directory_tokenizer_is_transformers(llama_dir):
    """tokenizer.json (byte-level, not Mistral's) + its chat template: ids and the rendered chat
    as transformers' AutoTokenizer of the directory gives them."""
    path, _ = llama_dir
    ours, ref = load(str(path))[1], transformers.AutoTokenizer.from_pretrained(str(path))
    assert isinstance(ours, TemplateTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.chat_tokens(CONVERSATION) == ref.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert (ours.eos_id, ours.add_bos) == (ref.eos_token_id, False)
    steps = list(stream_generate(load(str(path))[0], ours, ours.chat_tokens(CONVERSATION), max_tokens=3))
    assert len(steps) == 3 and all(0 <= s.token < ours.vocab_size for s in steps)


def test_llama_directory_converts_to_4_bit(llama_dir, tmp_path):
    path, _ = llama_dir
    convert(str(path), tmp_path / "q4", quantization=Quantization(group_size=32, bits=4))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in (tmp_path / "q4").iterdir()}
    model, tokenizer = load(str(tmp_path / "q4"))
    assert model.args.quantization == Quantization(32, 4) and isinstance(tokenizer, TemplateTokenizer)
    assert tokenizer.chat_tokens(CONVERSATION) == load(str(path))[1].chat_tokens(CONVERSATION)
    source = mx.load(str(path / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    stored = {}
    for file in (tmp_path / "q4").glob("*.safetensors"):
        stored.update(mx.load(str(file)))
    w, scales, biases = mx.quantize(source, 32, 4)
    assert mx.array_equal(stored["model.layers.1.mlp.down_proj.weight"], w).item()
    assert mx.array_equal(stored["model.layers.1.mlp.down_proj.scales"], scales).item()


@pytest.mark.parametrize("key,value,message", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_type 'llama3' is not supported"),
    ("pretraining_tp", 2, "pretraining_tp must be 1, got 2"),
    ("rope_interleaved", True, "rope_interleaved must be False, got True"),
])
def test_llama_config_keys_that_change_the_maths_are_refused(llama_dir, tmp_path, key, value, message):
    path, _ = llama_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(MistralError, match=message):
        load(str(tmp_path))
