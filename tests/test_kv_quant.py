"""The KV cache at 8 and 4 bits: mlx-lm's quantized cache as the oracle, wrapping chunks,
ragged batches, quality against the float cache, memory, and bad input."""

import functools
import json
import os

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from checkpoints import tiny_config, write_hf
from mlx_mistral import MistralError, batch_stream_generate, load, make_cache, stream_generate
from mlx_mistral.cache import RollingKVCache
from mlx_mistral.memory import MISTRAL_7B, kv_bytes_per_token
from mlx_mistral.memory import main as memory_main

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


@pytest.fixture
def load_model(loader):
    """conftest's loader: load() with the CPU backend's swaps (cpu.py) and without them
    (MLX_MISTRAL_CPU_PATHS=0, the path a Mac runs), asserting which one loaded."""
    return loader


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


@pytest.mark.parametrize("bits", [8, 4])
def test_heads_on_cpu_streams_equal_one_stream(windowless_dir, monkeypatch, bits):
    """The CPU path attends to the K/V heads of a quantized cache on one CPU stream per core
    (Attention.head_streams, set by cpu.prepare_for_cpu; never on the Mac path). Same kernels
    on the same inputs: the same logits bit for bit, chunks and decode."""
    from mlx_mistral.cpu import cpu_streams
    from mlx_mistral.model import Attention

    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")
    assert all(m.head_streams is None for m in load(str(windowless_dir))[0].modules() if isinstance(m, Attention))
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "1")
    model, _ = load(str(windowless_dir))
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    assert all(m.head_streams for m in attention) == (len(os.sched_getaffinity(0)) > 1)

    def logits(head_streams, sizes):
        for m in attention:
            m.head_streams = head_streams
        return run_chunks(model, make_cache(model.args, 64, kv_bits=bits), IDS, sizes)

    for sizes in (CHUNKINGS["uneven"], CHUNKINGS["token by token"]):
        one = logits(None, sizes)
        for parts in (2, 3):
            assert np.array_equal(logits(functools.partial(cpu_streams, parts), sizes), one)


def test_quantization_changes_the_logits(windowless_dir):
    """Guards the oracle test against comparing two float caches: 4-bit K/V must differ."""
    model, _ = load(str(windowless_dir))
    float_logits = run_chunks(model, make_cache(model.args, 64), IDS, [16] * 3)
    diffs = {bits: np.abs(run_chunks(model, make_cache(model.args, 64, kv_bits=bits), IDS, [16] * 3)
                          - float_logits).max() for bits in (8, 4)}
    print(f"max abs logit diff vs the float cache: 8-bit {diffs[8]:.2e}, 4-bit {diffs[4]:.2e}")
    assert 1e-4 < diffs[8] < diffs[4]


@pytest.mark.parametrize("bits", [8, 4])
def test_windowed_chunks_that_wrap_equal_token_by_token(windowed_dir, load_model, bits):
    """W = 8: chunks of 5 and 11 wrap the buffer mid-chunk (and 11 > W overwrites itself)."""
    model, _ = load_model(windowed_dir)
    assert model.args.sliding_window == 8
    one_by_one = run_chunks(model, make_cache(model.args, kv_bits=bits), IDS, [1] * len(IDS))
    for sizes in ([5] * 9 + [3], [3, 11, 5, 6, 7, 11, 5]):
        cache = make_cache(model.args, kv_bits=bits)
        diff = np.abs(run_chunks(model, cache, IDS, sizes) - one_by_one).max()
        print(f"{bits}-bit, chunks {sizes[:3]}...: max abs diff vs token by token {diff:.2e}")
        assert diff <= 1e-4 and cache.capacity == 8


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_ragged_batch_equals_single_runs(windowed_dir, load_model, bits, group):
    """Rows of different lengths (some past the window) decode together, leave the batch at
    different steps (keep), and equal their single runs token for token (greedy)."""
    model, tok = load_model(windowed_dir)
    prompts = [IDS[:1], IDS[:6], IDS[:13], IDS[:30]]
    limits = [9, 3, 12, 6]
    kv = dict(kv_bits=bits, kv_group_size=group)
    singles = [[r.token for r in stream_generate(model, tok, p, max_tokens=n, **kv)]
               for p, n in zip(prompts, limits)]
    batch = [[] for _ in prompts]
    for i, r in batch_stream_generate(model, tok, prompts, max_tokens=limits, **kv):
        batch[i].append(r.token)
    assert batch == singles and [len(s) for s in singles] == limits


def kv_bytes_formula(args, capacity, bits, group, dtype_bytes, batch=1):
    """memory.py's formula: codes (head_dim * bits / 8 bytes) + a scale and a bias per group."""
    return batch * capacity * kv_bytes_per_token(args, dtype_bytes, bits=bits, group=group)


@pytest.mark.parametrize("bits,group,dtype", [(8, 64, mx.float32), (4, 32, mx.float16), (4, 64, mx.bfloat16)])
def test_allocated_bytes_are_the_formula_and_never_grow(windowed_dir, bits, group, dtype):
    model, _ = load(str(windowed_dir))
    cache = make_cache(model.args, batch_size=2, dtype=dtype, kv_bits=bits, kv_group_size=group)
    expected = kv_bytes_formula(model.args, 8, bits, group, dtype.size, batch=2)
    assert cache.nbytes == expected
    model(mx.array([IDS[:20], IDS[20:40]]), cache)
    for token in IDS[:10]:
        model(mx.array([[token], [token]]), cache)
    mx.eval(cache.keys, cache.values)
    assert cache.nbytes == expected and cache.keys[0][0].dtype == mx.uint32 and cache.keys[0][1].dtype == dtype
    stacked = RollingKVCache.stack([cache, cache])
    stacked.keep([3, 0, 1])
    assert stacked.nbytes == expected * 3 // 2 and stacked.offsets == [30, 30, 30]


def test_bad_settings_get_one_clear_error():
    from mlx_mistral.demo import DEMO_ARGS  # head_dim 32
    for kwargs, message in [
        (dict(kv_bits=3), "kv_bits must be 4 or 8"),
        (dict(kv_bits=True), "kv_bits must be 4 or 8"),
        (dict(kv_bits=8), r"kv_group_size must be one of 32, 64, 128 and divide head_dim \(32\), got 64"),
        (dict(kv_bits=8, kv_group_size=48), "kv_group_size must be one of"),
        (dict(kv_bits=4, kv_group_size=32, dtype=mx.int32), "float16, bfloat16 or float32"),
    ]:
        with pytest.raises(MistralError, match=message):
            make_cache(DEMO_ARGS, 16, **kwargs)
    cache = RollingKVCache(DEMO_ARGS, 4, bits=8, group_size=32)
    with pytest.raises(ValueError, match="quantization"):
        RollingKVCache.stack([cache, RollingKVCache(DEMO_ARGS, 4, bits=4, group_size=32)])


def test_cli_and_app_take_kv_bits(capsys):
    from app.__main__ import main as app_main
    from mlx_mistral.demo import DEMO_ARGS
    from mlx_mistral.generate.__main__ import main as generate_main

    demo = ["--model", "demo", "--prompt", "hi", "--max-tokens", "3", "--json"]
    assert generate_main(demo + ["--kv-bits", "4", "--kv-group-size", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache_bytes"] == kv_bytes_formula(DEMO_ARGS, out["prompt_tokens"] + 3, 4, 32, 4)
    for argv, message in [(demo + ["--kv-bits", "3"], "error: kv_bits must be 4 or 8"),
                          (demo + ["--kv-bits", "8"], "error: kv_group_size must be one of 32, 64, 128 and "
                                                      "divide head_dim (32), got 64"),
                          (["--kv-bits", "8", "--kv-group-size", "48"], "error: kv_group_size must be one of")]:
        main = generate_main if "--prompt" in argv else app_main
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), errors


@pytest.mark.parametrize("bits", [8, 4])
def test_peak_memory_grows_only_by_the_score_matrix(bits, cpu_paths):
    """The bound: a step of L tokens at context n needs, beyond weights and cache, what a
    context of 0 needs plus per context token
      decode (L = 1): the score matrix only, H * L float32 (the cache is read in place);
      chunk:          the score matrix + its mask, built as the held slots' part (L bools)
                      then joined to the chunk's (L bools again): a chunk that does not wrap
                      the buffer is written first and attends to the slots in place.
    Dequantizing K/V (as a float cache) would add 2 * n_kv * head_dim * 4 bytes per token per
    layer; attending to [held slots, chunk] concatenated, one layer's quantized K/V. Both the
    path a Mac runs and the CPU backend's (cpu.prepare_for_cpu: the K/V heads on its streams)."""
    from mlx_mistral import Mistral, ModelArgs
    from mlx_mistral.cpu import cpu_paths_on, prepare_for_cpu
    from mlx_mistral.model import Attention

    args = ModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=256, vocab_size=512,
                     sliding_window=None, max_position_embeddings=16384)
    model = Mistral(args)
    mx.eval(model.parameters())
    if cpu_paths_on():  # as loading.build_model does
        prepare_for_cpu(model)
    streams = [bool(m.head_streams) for m in model.modules() if isinstance(m, Attention)]
    assert set(streams) == {cpu_paths and len(os.sched_getaffinity(0)) > 1}  # the path it was given
    for L, allowed in ((1, args.n_heads * 4), (16, args.n_heads * 16 * 4 + 2 * 16)):
        peaks = []
        for n in (512, 8192):  # a long span: the allocator's noise (~100 KB) is a few B per token
            cache = make_cache(args, 16384, kv_bits=bits)
            cache.offsets = [n]  # slots hold zeros: memory does not depend on their values
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(model(mx.array([[3] * L]), cache), cache.keys, cache.values)
            peaks.append(mx.get_peak_memory() - base)
        per_token = (peaks[1] - peaks[0]) / (8192 - 512)
        print(f"{bits}-bit, L={L}: peak grows {per_token:.0f} B per context token (bound {allowed})")
        assert per_token <= 1.05 * allowed


def test_memory_table_with_kv_bits(capsys):
    """7B: 8-bit K/V is 136/256 of fp16, 4-bit 72/256 (3.6x smaller); the CLI cross-checks
    its formula against a real quantized cache and rejects bad settings in one line."""
    fp16 = kv_bytes_per_token(MISTRAL_7B)
    assert kv_bytes_per_token(MISTRAL_7B, bits=8) * 256 == fp16 * 136
    assert kv_bytes_per_token(MISTRAL_7B, bits=4) * 256 == fp16 * 72
    for bits in ("8", "4"):
        assert memory_main(["--kv-bits", bits, "--window", "0", "--lengths", "8192,32768", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["cross_check"]["allocated"] == r["cross_check"]["formula"] and r["kv_bits"] == int(bits)
        assert r["by_length"]["32768"]["gqa"] == 32768 * kv_bytes_per_token(MISTRAL_7B, bits=int(bits))
    assert r["by_kv_bits"]["32768"] == {"fp16": 4 * 2**30, "8bit": 2176 * 2**20, "4bit": 1152 * 2**20}
    for argv in (["--kv-bits", "3"], ["--kv-bits", "8", "--kv-group-size", "256"]):
        assert memory_main(argv) == 2
        assert capsys.readouterr().err.startswith("error: kv_")


# bits -> (max mean KL, min top-1 agreement) against the float cache on the tiny windowless
# model over 256 positions (chunks of 64), from measurement with margin. Over 5 id seeds:
# 8-bit KL 0.9e-5-2.5e-5, top-1 0.96-0.99; 4-bit KL 2.3e-3-4.6e-3, top-1 0.65-0.85 (random
# weights: near-flat distributions make top-1 a weak signal). The `small` preset over 2048
# positions: benchmarks/bench_kv_quality.py.
KV_QUALITY = {8: (5e-5, 0.9), 4: (1e-2, 0.55)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quality_against_the_float_cache(windowless_dir, bits):
    from test_convert import kl_and_top1

    model, _ = load(str(windowless_dir))
    ids = np.random.default_rng(3).integers(3, 32000, 256).tolist()
    reference = run_chunks(model, make_cache(model.args, 256), ids, [64] * 4)
    quantized = run_chunks(model, make_cache(model.args, 256, kv_bits=bits), ids, [64] * 4)
    kl, top1 = kl_and_top1(reference, quantized)
    print(f"{bits}-bit K/V vs float, {len(ids)} positions: mean KL {kl:.2e}, top-1 agreement {top1:.3f}")
    max_kl, min_top1 = KV_QUALITY[bits]
    assert kl <= max_kl and top1 >= min_top1


def test_float16_mac_path_matches_mlx_lm(windowless_dir, monkeypatch):
    """A Mac's model: float16, plain nn.Linear (no cpu.py swaps); scales and biases in float16."""
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")
    ours_model, _ = load(str(windowless_dir), dtype=mx.float16)
    theirs_model, _ = mlx_lm.load(str(windowless_dir))
    theirs_model.set_dtype(mx.float16)
    for sizes in (CHUNKINGS["uneven"], CHUNKINGS["token by token"]):
        cache = make_cache(ours_model.args, 64, dtype=ours_model.dtype, kv_bits=4)
        ours = run_chunks(ours_model, cache, IDS, sizes)
        theirs = run_chunks(theirs_model, [QuantizedKVCache(64, 4) for _ in theirs_model.layers], IDS, sizes)
        diff = np.abs(ours.astype(np.float32) - theirs.astype(np.float32)).max()
        print(f"float16, 4-bit K/V, chunks {sizes[:5]}: max abs logit diff vs mlx-lm {diff:.2e}")
        assert cache.keys[0][1].dtype == mx.float16 and diff <= 1e-4  # measured: 0
