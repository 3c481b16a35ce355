"""Oracle parity with transformers' MistralForCausalLM (float32, eager, full sequence)."""

import copy
import itertools

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import oracle_logits
from mlx_mistral import generate_step, load, make_cache, make_sampler

W = 8
TEXT = ("The quick brown fox jumps over the lazy dog while the sliding window keeps only "
        "the last few keys; positions wrap around the rolling buffer many times over here, "
        "and every chunk size must give the same logits as the reference implementation.")


def run_chunks(model, ids, chunks, capacity=None):
    """Our logits [L, vocab] (as float32) feeding `ids` in the given chunk sizes (cycled)."""
    cache = make_cache(model.args, capacity, dtype=model.dtype)
    out, start, i = [], 0, 0
    while start < len(ids):
        n = chunks[i % len(chunks)]
        out.append(model(mx.array([ids[start:start + n]]), cache)[0])
        start, i = start + n, i + 1
    return np.array(mx.concatenate(out, axis=0).astype(mx.float32))


def parity(loader, model_dir, hf, mode, label, capacity=None):
    """Max abs logit difference between our model (fed in MODES[mode] chunks) and the oracle."""
    model, tokenizer = loader(model_dir)
    ids = prompt_ids(tokenizer, 5 * W)
    diff = np.abs(run_chunks(model, ids, MODES[mode], capacity) - oracle_logits(hf, ids)).max()
    print(f"{label}, {mode}: max abs logit diff {diff:.2e}")
    return diff


def prompt_ids(tokenizer, n):
    ids = tokenizer.encode(TEXT, bos=True)
    assert len(ids) >= n
    return ids[:n]


MODES = {
    "token by token": [1],
    "chunks of 3": [3],
    "chunks of W": [W],
    "chunks wrapping mid-chunk": [5, 7, 2, 6],
    "chunks longer than W": [W + 3, 1, 2 * W],
    "one prefill": [10_000],
}


@pytest.mark.parametrize("mode", MODES)
def test_windowed_matches_transformers(hf_checkpoint, mode, loader):
    assert parity(loader, hf_checkpoint[0], hf_checkpoint[1], mode, "windowed") <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_original_layout_matches_transformers(hf_checkpoint, original_checkpoint, mode, loader):
    assert parity(loader, original_checkpoint, hf_checkpoint[1], mode, "original layout") <= 1e-4


# Reduced precision, on the path a Mac runs (CPU paths off): ours in bfloat16 / float16 vs
# transformers in the same dtype. Both round differently, so they cannot agree to 1e-4.
# Measured max abs logit difference over every chunking (logits of these models lie in
# [-3.3, 3.3]; one ulp at |x| in [2, 4) is 2^-6 = 0.0156 in bfloat16, 2^-9 = 0.00195 in float16):
#   bfloat16: 0.0312 windowed, 0.0322 windowless (about 2 ulps)
#   float16:  0.0046 windowed, 0.0050 windowless (about 2.5 ulps)
# Each tolerance is 2x the larger measurement, rounded up (4 and 5 ulps): room for a different
# summation order in a new MLX or transformers, while a real error (a wrong mask or RoPE
# position) moves these logits by 0.1 or more (see test_window_changes_the_output).
HALF = {"bfloat16": 0.0625, "float16": 0.01}


def half_oracle(hf, dtype):
    return copy.deepcopy(hf).to(getattr(torch, dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("checkpoint", ["hf_checkpoint", "windowless"])
def test_half_precision_matches_transformers(checkpoint, dtype, mode, request, monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")
    path, hf = request.getfixturevalue(checkpoint)
    model, tokenizer = load(str(path), getattr(mx, dtype))
    ids = prompt_ids(tokenizer, 5 * W)
    diff = np.abs(run_chunks(model, ids, MODES[mode], 5 * W) - oracle_logits(half_oracle(hf, dtype), ids)).max()
    print(f"{checkpoint} {dtype}, {mode}: max abs logit diff {diff:.4f}")
    assert diff <= HALF[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_greedy_tokens_match_transformers(hf_checkpoint, dtype, monkeypatch):
    """40 greedy steps (5x the window, prefill in chunks of 3): each of our tokens is the
    oracle's argmax after the same prefix wherever the oracle's top-2 gap exceeds the
    tolerance (below it, either token is within rounding of the best)."""
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")
    model, tokenizer = load(str(hf_checkpoint[0]), getattr(mx, dtype))
    prompt = prompt_ids(tokenizer, W + 3)
    cache = make_cache(model.args, dtype=model.dtype)
    ours = list(itertools.islice(generate_step(model, prompt, cache, make_sampler(), prefill_chunk=3), 40))
    logits = oracle_logits(half_oracle(hf_checkpoint[1], dtype), prompt + ours[:-1])[len(prompt) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > HALF[dtype]
    print(f"{dtype}: {clear.sum()} of 40 steps with a top-2 gap over {HALF[dtype]}")
    assert clear.sum() >= 20  # measured: 26 (bfloat16), 37 (float16): most steps are checked
    assert (np.array(ours)[clear] == logits.argmax(-1)[clear]).all()


def test_window_changes_the_output(hf_checkpoint):
    """Past the window our logits differ from full causal attention (the window is real)."""
    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 3 * W)
    full = make_cache(model.args, 1000)  # capacity is capped at the window anyway
    assert full.capacity == W
    causal = oracle_logits(hf, ids, sliding_window=None)
    ours = run_chunks(model, ids, [1])
    assert np.abs(ours[:W] - causal[:W]).max() <= 1e-4
    assert np.abs(ours[W:] - causal[W:]).max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_windowless_matches_transformers(windowless, mode, loader):
    assert parity(loader, windowless[0], windowless[1], mode, "windowless", capacity=5 * W) <= 1e-4


def test_windowless_rolls_as_a_window_past_max_kv_size(windowless):
    """Capacity C < sequence: a windowless model behaves as a window of C, with one warning."""
    path, hf = windowless
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 5 * W)
    with pytest.warns(UserWarning, match="KV cache capacity"):
        ours = run_chunks(model, ids, [3, 1, 7], capacity=W)
    assert np.abs(ours - oracle_logits(hf, ids, sliding_window=W)).max() <= 1e-4


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 1, 128), (1, 15, 128), (5, 3, 128)])
def test_parallel_quantized_linear_is_bit_identical(parts, shape):
    """Splitting output rows over CPU streams changes no bit of the result (odd row counts too)."""
    import mlx.nn as nn

    from mlx_mistral.cpu import ParallelQuantizedLinear

    mx.random.seed(1)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 100, bias=False), group_size=64, bits=4)
    x = mx.random.normal(shape)
    split = ParallelQuantizedLinear(q, parts)
    assert split(x).shape == (*shape[:2], 100)
    assert mx.array_equal(split(x), q(x)).item()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32)])
@pytest.mark.parametrize("shape", [(1, 16, 128), (1, 37, 128), (4, 5, 128)])
def test_parallel_quantized_linear_chunks_use_the_dequantized_matrix(bits, group, shape):
    """From 16 rows of x on, the product is x @ dequantize(w).T: the same values as MLX's
    quantized matmul, summed by BLAS (float32 rounding apart)."""
    import mlx.nn as nn

    from mlx_mistral.cpu import ParallelQuantizedLinear

    mx.random.seed(1)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 100, bias=False), group_size=group, bits=bits)
    x = mx.random.normal(shape)
    out = ParallelQuantizedLinear(q, 2)(x)
    w = mx.dequantize(q.weight, q.scales, q.biases, group, bits)
    assert mx.array_equal(out, x @ w.T).item()
    assert mx.allclose(out, q(x), rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("yarn", [False, True])
def test_tabled_rope_is_fast_rope(dtype, yarn):
    """The CPU path's RoPE (tables built once per step, shared by the layers) is bit for bit
    mx.fast.rope: one offset or one per row, a token or a chunk, plain or YaRN periods."""
    from mlx_mistral.cpu import StepTables, TabledRoPE
    from mlx_mistral.rope import RoPE, Yarn

    mx.random.seed(4)
    step = StepTables()
    ropes = [RoPE(64, 1e6, Yarn(factor=4.0, original_max_position_embeddings=4096) if yarn else None)
             for _ in range(2)]  # two layers
    tabled = [TabledRoPE(r, step) for r in ropes]
    for offset in (0, 5000, mx.array([3, 4100, 70000])):
        for length in (1, 7):
            for heads in (9, 3):  # queries, keys
                x = mx.random.normal((3, heads, length, 64)).astype(dtype)
                for rope, mine in zip(ropes, tabled):
                    assert mx.array_equal(mine(x, offset), rope(x, offset)).item()
            assert len(step.tables) == 2  # one per shape, shared by both layers


@pytest.mark.parametrize("rows", [1, 3, 8, 15, 16, 40])
def test_transposed_linear_matches_linear(rows):
    """The [in, out] layout (padding 3-15 rows to 16 included) is the same product."""
    import mlx.nn as nn

    from mlx_mistral.cpu import TransposedLinear

    mx.random.seed(2)
    linear = nn.Linear(96, 80, bias=False)
    x = mx.random.normal((1, rows, 96))
    out = TransposedLinear(linear.weight)(x)
    assert out.shape == (1, rows, 80)
    assert mx.allclose(out, linear(x), atol=1e-5).item()


@pytest.mark.parametrize("pays", [True, False])
def test_prepare_for_cpu_transposes_only_where_it_pays(hf_checkpoint, monkeypatch, pays):
    """Every float Linear becomes a TransposedLinear when the CPU measures that layout faster,
    none otherwise; both match the oracle (transposed_pays itself decides from timings)."""
    import mlx.nn as nn

    from mlx_mistral import cpu

    assert isinstance(cpu.transposed_pays([mx.ones((8, 16))], reps=1), bool)
    monkeypatch.setattr(cpu, "transposed_pays", lambda weights: pays)
    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    kinds = {type(m) for m in model.modules()}
    assert (cpu.TransposedLinear in kinds, nn.Linear in kinds) == (pays, not pays)
    ids = prompt_ids(tokenizer, 5 * W)
    assert np.abs(run_chunks(model, ids, [5, 7, 2, 6]) - oracle_logits(hf, ids)).max() <= 1e-4


def test_load_fuses_qkv_and_gate_up(hf_checkpoint, monkeypatch):
    """After load every layer's q/k/v and gate/up are one matrix each (fused.py), and the function
    is the same: logits within 1e-4 of the oracle and within 1e-5 of the unfused model's."""
    from mlx_mistral.fused import FusedLinear
    from mlx_mistral.loading import build

    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    for block in model.model.layers:
        assert isinstance(block.self_attn.qkv, FusedLinear) and isinstance(block.mlp.gate_up, FusedLinear)
        assert not {"q_proj", "k_proj", "v_proj"} & set(block.self_attn) and "gate_proj" not in block.mlp
    ids = prompt_ids(tokenizer, 5 * W)
    fused = run_chunks(model, ids, [5, 1, 7])
    monkeypatch.setattr(build, "fuse_projections", lambda model: None)
    plain, _ = load(str(path))
    assert "q_proj" in plain.model.layers[0].self_attn
    assert np.abs(fused - run_chunks(plain, ids, [5, 1, 7])).max() <= 1e-5
    assert np.abs(fused - oracle_logits(hf, ids)).max() <= 1e-4


def test_stacked_projections():
    """Quantized layers of one width stack into one whose outputs are the parts' own, bit for bit;
    biases or mixed widths are left unfused."""
    import mlx.nn as nn

    from mlx_mistral.fused import FusedLinear, stacked

    mx.random.seed(3)
    parts = [nn.QuantizedLinear(64, rows, bias=False, group_size=32, bits=4) for rows in (48, 16, 16)]
    x = mx.random.normal((2, 3, 64))
    outs = FusedLinear(stacked(parts), [48, 64])(x)
    assert [o.shape for o in outs] == [(2, 3, 48), (2, 3, 16), (2, 3, 16)]
    assert all(mx.array_equal(o, p(x)).item() for o, p in zip(outs, parts))
    assert stacked([parts[0], nn.QuantizedLinear(64, 16, bias=False, group_size=32, bits=8)]) is None
    assert stacked([nn.Linear(64, 16), nn.Linear(64, 16)]) is None


def test_folded_decode_attention_matches(hf_checkpoint):
    """Folding a decoded token's query heads into rows (the CPU path) stays within float
    rounding of the per-head attention, through the window and past it."""
    from mlx_mistral.model import Attention

    model, tokenizer = load(str(hf_checkpoint[0]))
    ids = prompt_ids(tokenizer, 5 * W)

    def logits(fold):
        for m in model.modules():
            if isinstance(m, Attention):
                m.fold_gqa = fold
        return run_chunks(model, ids, MODES["token by token"])

    assert np.abs(logits(True) - logits(False)).max() <= 1e-5


def test_cpu_paths_switch_takes_only_0_or_1(hf_checkpoint, monkeypatch):
    from mlx_mistral import MistralError

    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "off")
    with pytest.raises(MistralError, match="MLX_MISTRAL_CPU_PATHS must be 0 or 1, got 'off'"):
        load(str(hf_checkpoint[0]))
