"""The KV cache at 8 and 4 bits: mlx-lm's quantized cache as the oracle, wrapping chunks,
ragged batches, quality against the float cache, memory, and bad input."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache

import mlx_mistral.loading
from checkpoints import tiny_config, write_hf
from mlx_mistral import MistralError, load, make_cache

# head_dim 64: mx.quantize groups are 32, 64 or 128 wide, so the usual tiny head_dim 16 cannot be.
QUANT_CONFIG = dict(head_dim=64, max_position_embeddings=256)
IDS = [1] + [(7 * i * i + 3 * i) % 31990 + 5 for i in range(47)]
SETTINGS = [(8, 64), (4, 64), (4, 32)]
CHUNKINGS = {"prefill": [len(IDS)], "chunks of 5": [5] * 9 + [3], "chunks of 16": [16] * 3,
             "uneven": [1, 9, 2, 17, 19], "token by token": [1] * len(IDS)}


@pytest.fixture(scope="module")
def windowless_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvq_windowless")
    write_hf(path, tiny_config(sliding_window=None, **QUANT_CONFIG), seed=1)
    return path


@pytest.fixture(scope="module")
def windowed_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvq_windowed")
    write_hf(path, tiny_config(sliding_window=8, **QUANT_CONFIG), seed=2)
    return path


@pytest.fixture(params=["cpu paths", "mac path"])
def load_model(request, monkeypatch):
    """load(), with the CPU backend's swaps (cpu.py), or without them: the plain
    nn.Linear model a Mac runs."""
    if request.param == "mac path":
        monkeypatch.setattr(mlx_mistral.loading, "prepare_for_cpu", lambda model: None)
    return lambda path: load(str(path))


def run_chunks(model, cache, ids, sizes):
    """Logits [len(ids), vocab] fed in chunks of `sizes` (model(tokens, cache) per chunk)."""
    out, start = [], 0
    for n in sizes:
        out.append(model(mx.array([ids[start:start + n]]), cache)[0])
        start += n
    assert start == len(ids)
    return np.array(mx.concatenate(out))


@pytest.mark.parametrize("bits,group", SETTINGS)
def test_matches_mlx_lm_quantized_cache(windowless_dir, load_model, bits, group):
    """Same logits as mlx-lm's QuantizedKVCache (quantizing from the first token) <= 1e-4.

    Both quantize the new tokens before attending to them (mlx-lm stores first, then
    attends to what it stored), so a token's own key is the quantized one in both.
    What differs is only the order of float operations (mlx-lm materialises the causal
    mask as a boolean array and masks with finfo.min instead of -inf)."""
    ours_model, _ = load_model(windowless_dir)
    theirs_model, _ = mlx_lm.load(str(windowless_dir))
    n_layers = len(theirs_model.layers)
    for name, sizes in CHUNKINGS.items():
        ours = run_chunks(ours_model, make_cache(ours_model.args, 64, kv_bits=bits, kv_group_size=group),
                          IDS, sizes)
        theirs = run_chunks(theirs_model, [QuantizedKVCache(group, bits) for _ in range(n_layers)], IDS, sizes)
        diff = np.abs(ours - theirs).max()
        print(f"{bits}-bit group {group}, {name}: max abs logit diff vs mlx-lm {diff:.2e}")
        assert diff <= 1e-4, name


def test_quantization_changes_the_logits(windowless_dir):
    """Guards the oracle test against comparing two float caches: 4-bit K/V must differ."""
    model, _ = load(str(windowless_dir))
    float_logits = run_chunks(model, make_cache(model.args, 64), IDS, [16] * 3)
    diffs = {bits: np.abs(run_chunks(model, make_cache(model.args, 64, kv_bits=bits), IDS, [16] * 3)
                          - float_logits).max() for bits in (8, 4)}
    print(f"max abs logit diff vs the float cache: 8-bit {diffs[8]:.2e}, 4-bit {diffs[4]:.2e}")
    assert 1e-4 < diffs[8] < diffs[4]
