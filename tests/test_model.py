"""Oracle parity with transformers' MistralForCausalLM (float32, eager, full sequence)."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import oracle_logits
from mlx_mistral import load, make_cache

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


def oracle_with_window(hf, ids, window):
    """Oracle logits with the HF model's sliding_window temporarily set to `window`."""
    saved, hf.config.sliding_window = hf.config.sliding_window, window
    try:
        return oracle_logits(hf, ids)
    finally:
        hf.config.sliding_window = saved


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


def test_window_changes_the_output(hf_checkpoint):
    """Past the window our logits differ from full causal attention (the window is real)."""
    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 3 * W)
    full = make_cache(model.args, 1000)  # capacity is capped at the window anyway
    assert full.capacity == W
    causal = oracle_with_window(hf, ids, None)
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
    assert np.abs(ours - oracle_with_window(hf, ids, W)).max() <= 1e-4


@pytest.mark.parametrize("parts", [2, 3, 8])
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 1, 128), (1, 37, 128)])
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
