"""Rolling-buffer cache: fixed allocation, slot arithmetic, masks, GQA-sized buffers."""

import itertools

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
import numpy as np
import pytest

from mlx_mistral import MistralError, ModelArgs, load, make_cache
from mlx_mistral.cache import RollingKVCache

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, hidden_dim=128,
                 vocab_size=100, sliding_window=8)


def test_slot_positions_worked_example():
    cache = RollingKVCache(ARGS, capacity=4)
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
