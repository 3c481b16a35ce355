"""Rolling-buffer cache: fixed allocation, slot arithmetic, masks, GQA-sized buffers."""

import itertools

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
import numpy as np
import pytest

from mlx_mistral import Mistral, MistralError, ModelArgs, load, make_cache
from mlx_mistral.cache import RollingKVCache

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, hidden_dim=128,
                 vocab_size=100, sliding_window=8)


def test_slot_positions_worked_example():
    cache = RollingKVCache(ARGS, window=4)
    assert cache.slot_positions().tolist() == [-4, -3, -2, -1]  # all empty
    cache.offsets = [6]
    assert cache.slot_positions().tolist() == [4, 5, 2, 3]


def test_buffers_are_gqa_sized_and_allocated_once():
    cache = make_cache(ARGS)
    assert cache.capacity == 8
    for k, v in zip(cache.keys, cache.values):
        assert k.shape == v.shape == (1, ARGS.n_kv_heads, 8, ARGS.head_dim)  # 2 heads, not 8
    assert cache.nbytes == 2 * ARGS.n_layers * ARGS.n_kv_heads * 8 * ARGS.head_dim * 4


def test_allocated_bytes_do_not_grow(hf_checkpoint):
    model, tokenizer = load(str(hf_checkpoint[0]))
    W = model.args.sliding_window
    cache = make_cache(model.args)
    ids = mx.array([list(range(10, 10 + W))])
    sizes = {}
    for step in range(10):
        for chunk in (ids[:, :3], ids[:, 3:4], ids[:, 4:]):
            model(chunk, cache)
        mx.eval(cache.keys, cache.values)
        sizes[step + 1] = (cache.nbytes, sum(k.nbytes for k in cache.keys), cache.keys[0].shape)
    assert cache.offset == 10 * W
    assert sizes[2] == sizes[10]
    assert cache.size == W


def test_windowless_capacity_follows_max_kv_size():
    args = ModelArgs(**{**ARGS.__dict__, "sliding_window": None, "max_position_embeddings": 64})
    assert make_cache(args, max_kv_size=20).capacity == 20
    assert make_cache(args).capacity == 64  # capped at the model's context
    assert make_cache(ARGS, max_kv_size=1000).capacity == 8  # never more than the window
    with pytest.raises(MistralError, match="max_kv_size"):
        make_cache(args, max_kv_size=0)


@pytest.mark.parametrize("capacity,offset,length", list(itertools.product([4, 7], [0, 1, 3, 6, 13, 20], [1, 2, 4, 9])))
def test_mask_matches_brute_force(capacity, offset, length):
    """Mask == (k <= q) & (k > q - C) over the keys attended to: the slots in use, then the chunk."""
    cache = RollingKVCache(ARGS, capacity)
    cache.offsets = [offset]
    mask = cache.mask(length)
    queries = offset + np.arange(length)
    if length == 1:  # decode: the token's own slot is written first; slots in use only
        keys = np.array([offset - ((offset - s) % capacity) for s in range(min(offset + 1, capacity))])
    else:  # a chunk: the slots in use before it is written, then the chunk itself
        slots = np.array(cache.slot_positions())[: min(offset, capacity)]
        keys = np.concatenate([slots, queries])
    assert (keys >= 0).all()  # only filled slots are attended to
    expected = (keys[None] <= queries[:, None]) & (keys[None] > queries[:, None] - capacity)
    if mask is None:
        got = np.ones_like(expected)
    elif isinstance(mask, str):
        assert mask == "causal"
        got = np.tril(np.ones((length, length), bool))
    else:
        got = np.broadcast_to(np.array(mask), expected.shape)
    assert (got == expected).all()
    assert expected.any(axis=1).all()  # no row without a key: no NaN


def test_ragged_decode_mask():
    """Rows at positions 1 and 5 (C = 4): the short row must not see the slots it never filled."""
    cache = RollingKVCache(ARGS, 4, batch_size=2)
    cache.offsets = [1, 5]
    mask = np.array(cache.mask(1))
    assert mask.shape == (2, 1, 1, 4)
    assert mask[0, 0, 0].tolist() == [True, True, False, False] and mask[1, 0, 0].all()


@pytest.mark.parametrize("offsets", [[0, 5], [0, 3, 11], [1, 2], [2, 9, 30], [0, 0, 4]])
def test_ragged_decode_mask_has_no_fully_masked_row(offsets):
    """However far apart the rows are, each sees its own new token (slot offset % C), so
    no row of the mask is all False (where GPU attention kernels may return NaN)."""
    cache = RollingKVCache(ARGS, 4, batch_size=len(offsets))
    cache.offsets = offsets
    mask = np.array(cache.mask(1))[:, 0, 0]
    assert mask[np.arange(len(offsets)), [o % 4 for o in offsets]].all()
    assert mask.sum(axis=1).tolist() == [min(o + 1, 4) for o in offsets]  # all it holds, no more


@pytest.mark.parametrize("bits", [None, 8])
def test_extend_and_keep_copy_one_layer_at_a_time(bits):
    """A row joining or leaving a batch copies the batch's K/V a layer at a time: the
    transient is one layer's arrays, not a second copy of the whole cache."""
    args = ModelArgs(dim=64, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=128, vocab_size=100)
    batch = RollingKVCache(args, 512, 8, bits=bits, group_size=32)
    batch.offsets = [5, 9, 1, 7, 3, 2, 8, 4]
    noise = lambda x: (mx.random.uniform(shape=x.shape) * 1000).astype(x.dtype)  # noqa: E731
    batch.keys, batch.values = tree_map(noise, (batch.keys, batch.values))
    new = RollingKVCache(args, 512, 1, bits=bits, group_size=32)
    before = [np.array(leaf) for _, leaf in tree_flatten((batch.keys, batch.values))]
    layer, added = batch.nbytes // (2 * args.n_layers), new.nbytes  # layer: one layer's keys (or values)
    mx.synchronize()
    mx.clear_cache()  # no freed buffer of an earlier test reused (a larger one counts its whole size)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    batch.extend(new)
    del new
    extend_peak = mx.get_peak_memory() - base
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    batch.keep([8, 0, 2])
    keep_peak = mx.get_peak_memory() - base
    # beyond the row added, one layer's new arrays (9 rows; then 3) at most, plus the row index and the
    # allocator's rounding (under a page per array: 3 arrays when quantized): a whole copy would be 16 layers
    slack = 64 + 3 * 4096
    assert extend_peak <= added + layer * 9 / 8 + slack and keep_peak <= layer * 3 / 8 + slack
    assert batch.offsets == [0, 5, 1] and batch.nbytes == 3 * 2 * args.n_layers * layer // 8
    after = tree_flatten((batch.keys, batch.values))
    for old, (_, new_leaf) in zip(before, after):
        assert np.array_equal(np.array(new_leaf)[1:], old[[0, 2]])


@pytest.mark.parametrize("bits", [None, 8])
def test_verify_and_rewind_past_the_wrap_equal_token_by_token_decode(bits):
    """Speculation's steps in a ring of W + 3 slots: each round feeds every row its last token
    plus 3 drafts (ragged rows, masked), keeps a few of them and rewinds the rest. Every logit
    of every kept position equals that of a W-slot cache fed the kept tokens one at a time,
    round after round past several wraps of the window (W = 8)."""
    mx.random.seed(3)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128,
                     vocab_size=100, sliding_window=8)
    model = Mistral(args)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100, 5).tolist(), rng.integers(0, 100, 11).tolist()]
    kw = dict(kv_bits=bits, kv_group_size=32)
    caches, solo = [], []
    for p in prompts:
        caches.append(make_cache(args, headroom=3, **kw))
        solo.append(make_cache(args, **kw))
        model(mx.array([p[:-1]]), caches[-1])
        model(mx.array([p[:-1]]), solo[-1])
    cache = RollingKVCache.stack(caches)
    assert cache.capacity == 11 and cache.window == 8 and cache.offsets == [4, 10]
    last = [p[-1] for p in prompts]
    for _ in range(12):
        drafts = rng.integers(0, 100, (2, 3)).tolist()
        logits = model(mx.array([[y] + d for y, d in zip(last, drafts)]), cache)
        keep = rng.integers(0, 4, 2).tolist()  # drafts kept per row
        cache.rewind([3 - k for k in keep])
        for b in range(2):
            fed = [last[b]] + drafts[b][:keep[b]]
            for t, token in enumerate(fed):
                expected = model(mx.array([[token]]), solo[b])[0, 0]
                assert mx.allclose(logits[b, t], expected, atol=1e-5).item(), (b, t)
            last[b] = int(rng.integers(0, 100))
        assert cache.offsets == [s.offset for s in solo]


def test_step_mask_sees_the_window_by_position():
    """A 3-token step of rows at positions 2 and 13 in 8 + 3 slots: query q sees the slots whose
    position (after the write) is in (q - 8, q] and not empty."""
    cache = RollingKVCache(ARGS, 8, batch_size=2, headroom=3)
    cache.offsets = [2, 13]
    mask = np.array(cache.mask(3))[:, 0]  # [B, L, n]
    for b, first in enumerate(cache.offsets):
        last = first + 2
        held = [last - (last - s) % 11 for s in range(mask.shape[-1])]
        for t in range(3):
            q = first + t
            assert mask[b, t].tolist() == [h >= 0 and q - 8 < h <= q for h in held]
    one = RollingKVCache(ARGS, 8, headroom=3)
    one.offsets = [20]
    assert np.array(one.mask(1)).sum() == 8  # past the wrap a decode step needs a mask: 11 slots, 8 seen
    one.offsets = [5]
    assert one.mask(1) is None
