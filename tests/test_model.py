"""Oracle parity with transformers' MistralForCausalLM (float32, eager, full sequence)."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import oracle_logits, tiny_config, write_hf
from mlx_mistral import load, make_cache

W = 8
TEXT = ("The quick brown fox jumps over the lazy dog while the sliding window keeps only "
        "the last few keys; positions wrap around the rolling buffer many times over here, "
        "and every chunk size must give the same logits as the reference implementation.")


def run_chunks(model, ids, chunks, capacity=None):
    """Our logits [L, vocab] feeding `ids` in the given chunk sizes (cycled)."""
    cache = make_cache(model.args, capacity)
    out, start, i = [], 0, 0
    while start < len(ids):
        n = chunks[i % len(chunks)]
        out.append(model(mx.array([ids[start:start + n]]), cache)[0])
        start, i = start + n, i + 1
    return np.array(mx.concatenate(out, axis=0))


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
def test_windowed_matches_transformers(hf_checkpoint, mode):
    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 5 * W)
    diff = np.abs(run_chunks(model, ids, MODES[mode]) - oracle_logits(hf, ids)).max()
    print(f"windowed, {mode}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_original_layout_matches_transformers(hf_checkpoint, original_checkpoint, mode):
    model, tokenizer = load(str(original_checkpoint))
    ids = prompt_ids(tokenizer, 5 * W)
    diff = np.abs(run_chunks(model, ids, MODES[mode]) - oracle_logits(hf_checkpoint[1], ids)).max()
    print(f"original layout, {mode}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_window_changes_the_output(hf_checkpoint):
    """Past the window our logits differ from full causal attention (the window is real)."""
    path, hf = hf_checkpoint
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 3 * W)
    full = make_cache(model.args, 1000)  # capacity is capped at the window anyway
    assert full.capacity == W
    hf.config.sliding_window = None
    try:
        causal = oracle_logits(hf, ids)
    finally:
        hf.config.sliding_window = W
    ours = run_chunks(model, ids, [1])
    assert np.abs(ours[:W] - causal[:W]).max() <= 1e-4
    assert np.abs(ours[W:] - causal[W:]).max() > 1e-2


@pytest.fixture(scope="module")
def windowless(tmp_path_factory):
    path = tmp_path_factory.mktemp("windowless")
    return path, write_hf(path, tiny_config(sliding_window=None), seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_windowless_matches_transformers(windowless, mode):
    path, hf = windowless
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 5 * W)
    diff = np.abs(run_chunks(model, ids, MODES[mode], capacity=len(ids)) - oracle_logits(hf, ids)).max()
    print(f"windowless, {mode}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_windowless_rolls_as_a_window_past_max_kv_size(windowless):
    """Capacity C < sequence: a windowless model behaves as a window of C, with one warning."""
    path, hf = windowless
    model, tokenizer = load(str(path))
    ids = prompt_ids(tokenizer, 5 * W)
    with pytest.warns(UserWarning, match="KV cache capacity"):
        ours = run_chunks(model, ids, [3, 1, 7], capacity=W)
    hf.config.sliding_window = W
    try:
        expected = oracle_logits(hf, ids)
    finally:
        hf.config.sliding_window = None
    assert np.abs(ours - expected).max() <= 1e-4
