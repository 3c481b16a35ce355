"""The prefix cache's blocks (blocks.py, disk_cache.py) on tiny random models: a shared system
prompt is prefilled once and never changes an answer; blocks survive a restart on disk; bad
files are skipped; the tiers stay within their budgets."""

import os
import warnings

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import tiny_config, write_hf
from mlx_mistral.serve import Request, Scheduler
from mlx_mistral.serve.blocks import BLOCK_TOKENS, chain
from mlx_mistral.serve.disk_cache import DiskCache

SYSTEM = 1024  # tokens of the shared system prompt: 8 whole blocks
LAYERS = ["full_attention", "sliding_attention", "sliding_attention"] * 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories of tiny models (head_dim 32: 8-bit KV groups of 32 divide it): a 32-token
    window (a prefix 32x longer), no window, and per-layer windows (a LayeredKVCache)."""
    made = {}
    for name, config in (("windowed", dict(sliding_window=32)), ("windowless", dict(sliding_window=None)),
                         ("layered", dict(sliding_window=8, num_hidden_layers=6, layer_types=LAYERS))):
        path = tmp_path_factory.mktemp(name)
        write_hf(path, tiny_config(**config, head_dim=32, max_position_embeddings=2048), seed=5)
        made[name] = str(path)
    return made


def system_and_turn(tok, i: int) -> tuple[list[int], list[int]]:
    words = " ".join(f"tool{j} takes argument{j % 7} and returns value{j % 5}." for j in range(400))
    system = tok.encode(words, bos=True)[:SYSTEM]
    return system, tok.encode(f" Question {i}: what does tool{i} return for input {i * 3}?", bos=False)


def run(s: Scheduler, ids: list[int], **kw) -> tuple[list[int], object]:
    events = list(s.submit(Request(ids, max_tokens=10, **kw)).events())
    return [e.token for e in events if e.token is not None], events[-1]


@pytest.mark.parametrize("name, kv_bits", [("windowed", None), ("windowless", None), ("layered", None),
                                           ("windowed", 8), ("layered", 8)])
def test_a_shared_system_prompt_is_prefilled_once(models, name, kv_bits):
    """Two conversations with the same 1024-token system prompt: the second prefills only its
    own tokens, and its greedy answer equals the one prefilled whole."""
    s = Scheduler(models[name], max_idle=0, prefill_chunk=96, kv_bits=kv_bits, kv_group_size=32)
    try:
        system, _ = system_and_turn(s.tokenizer, 0)
        first, second = (system + system_and_turn(s.tokenizer, i)[1] for i in (1, 2))
        _, last = run(s, first)
        assert last.reused_tokens == 0 and s.stats()["blocks"] >= SYSTEM // BLOCK_TOKENS
        got, last = run(s, second)
        assert (last.reused_tokens, last.prefilled_tokens) == (SYSTEM, len(second) - SYSTEM)
        assert got == run(s, second, reuse=False)[0]
        blocks = s.prefixes.blocks
        if name != "windowless":  # a window's blocks keep only its last positions, whatever the prefix
            assert min(blocks.kept) < BLOCK_TOKENS
        stats = s.stats()
        assert stats["kv_bytes"] == stats["block_bytes"] == blocks.nbytes > 0  # no rows, no idle caches
    finally:
        s.close()


def test_agents_that_start_together_prefill_their_system_prompt_once(models):
    """Four requests with one system prompt arrive at once: one prefills it, the others wait for
    its blocks (BlockStore.wait_for) and prefill only their own tokens; answers are unchanged."""
    s = Scheduler(models["windowless"], max_idle=0)
    try:
        system, _ = system_and_turn(s.tokenizer, 0)
        prompts = [system + system_and_turn(s.tokenizer, i)[1] for i in range(4)]
        requests = [s.submit(Request(p, max_tokens=10)) for p in prompts]
        results = [[e for e in r.events()] for r in requests]
        assert sorted(events[-1].reused_tokens for events in results) == [0, SYSTEM, SYSTEM, SYSTEM]
        assert s.stats()["prefilled_tokens"] == sum(len(p) - 1 for p in prompts) - 3 * SYSTEM
        assert [[e.token for e in events if e.token is not None] for events in results] == \
            [run(s, p, reuse=False)[0] for p in prompts]
    finally:
        s.close()


@pytest.mark.parametrize("name, kv_bits", [("windowed", None), ("windowless", 8), ("layered", 8)])
def test_a_restored_cache_equals_the_prefilled_one(models, name, kv_bits):
    """restore writes each block's kept positions into their slots: every slot of every layer
    (codes, scales and biases when quantized) and the offsets equal a cache fed the prefix."""
    import mlx.core as mx
    from mlx_mistral.serve.blocks import groups

    s = Scheduler(models[name], max_idle=0, kv_bits=kv_bits, kv_group_size=32)
    try:
        system, turn = system_and_turn(s.tokenizer, 1)
        blocks = s.prefixes.blocks

        def prefilled_and_restored():
            cache = s._new_cache(False)
            for start in range(0, SYSTEM, BLOCK_TOKENS):  # a block at a time, each then captured
                s.model(mx.array([system[start:start + BLOCK_TOKENS]], dtype=mx.uint32), cache)
                blocks.capture(cache, 0, system[:start + BLOCK_TOKENS])
            return cache, blocks.restore(blocks.find(system + turn), False)

        cache, restored = s.call(prefilled_and_restored)
        assert restored.offsets == cache.offsets == [SYSTEM]
        for mine, theirs in zip(groups(restored), groups(cache)):
            assert all(s.call(lambda: mx.array_equal(a, b).item()) for a, b in zip(mine._arrays(), theirs._arrays()))
    finally:
        s.close()


def test_blocks_survive_a_restart_on_disk(models, tmp_path):
    """A new Scheduler on the same directory answers a repeated prompt from the files (nothing
    of it in memory), with the same greedy tokens."""
    s = Scheduler(models["windowless"], max_idle=0, prompt_cache_dir=str(tmp_path))
    try:
        system, turn = system_and_turn(s.tokenizer, 1)
        want, last = run(s, system + turn)
        assert last.reused_tokens == 0
    finally:
        s.close()  # writes what is pending
    assert len(list(tmp_path.glob("*.safetensors"))) >= SYSTEM // BLOCK_TOKENS
    s = Scheduler(models["windowless"], max_idle=0, prompt_cache_dir=str(tmp_path))
    try:
        assert s.stats()["blocks"] == 0 and s.stats()["disk_blocks"] >= SYSTEM // BLOCK_TOKENS
        got, last = run(s, system + turn)
        assert (got, last.reused_tokens) == (want, SYSTEM)
    finally:
        s.close()


def damage(file, how: str) -> None:
    if how == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    elif how == "garbage":
        file.write_bytes(os.urandom(4000))
    else:  # another model's block under this name: its metadata says so
        arrays = load_file(str(file))
        save_file(arrays, str(file), metadata={"model": "someone else's"})


@pytest.mark.parametrize("how", ["truncated", "garbage", "foreign"])
def test_a_bad_block_file_is_skipped_with_one_warning_and_deleted(models, tmp_path, how):
    """The file of the system prompt's last block is damaged: the restarted server warns once,
    deletes it, reuses the blocks before it and answers the same (and writes that block anew)."""
    s = Scheduler(models["windowed"], max_idle=0, prompt_cache_dir=str(tmp_path))
    try:
        system, turn = system_and_turn(s.tokenizer, 1)
        want, _ = run(s, system + turn)
    finally:
        s.close()
    s = Scheduler(models["windowed"], max_idle=0, prompt_cache_dir=str(tmp_path))
    try:
        bad = tmp_path / f"{chain(s.prefixes.blocks.seed, system)[-1]}.safetensors"
        damage(bad, how)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, last = run(s, system + turn)
        messages = [str(w.message) for w in caught if "prompt cache" in str(w.message)]
        assert len(messages) == 1 and messages[0].startswith(f"prompt cache: skipped and deleted {bad} (")
        assert got == want and last.reused_tokens == SYSTEM - BLOCK_TOKENS  # the blocks before it
        disk = s.prefixes.blocks.disk
        s.call(disk.flush)  # the prefill captured that block again: a good file replaces the bad one
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert s.call(disk.read, bad.stem) is not None
    finally:
        s.close()


def test_the_disk_tier_stays_within_its_budget(models, tmp_path):
    """Least recently used files go first, before a file would pass the budget; the newest
    prompt's blocks are kept, and read back with nothing in memory."""
    s = Scheduler(models["windowed"], max_idle=0, prompt_cache_dir=str(tmp_path / "one"))
    try:
        run(s, [1] + [99] * BLOCK_TOKENS)
    finally:
        s.close()
    one = sum(f.stat().st_size for f in (tmp_path / "one").iterdir())  # one block's file
    s = Scheduler(models["windowed"], max_idle=0, prompt_cache_dir=str(tmp_path / "disk"), prompt_cache_bytes=0,
                  prompt_cache_disk_bytes=int(3.5 * one))
    try:
        disk = s.prefixes.blocks.disk
        for i in range(3):
            run(s, [1] + [100 + i] * (3 * BLOCK_TOKENS))  # 3 blocks of a new prompt each time
            s.call(disk.flush)
            sizes = [f.stat().st_size for f in (tmp_path / "disk").iterdir()]
            assert sum(sizes) == disk.nbytes <= 3.5 * one and s.stats()["blocks"] == 0
        assert sizes == [one] * 3
        _, last = run(s, [1] + [102] * (3 * BLOCK_TOKENS) + [7])
        assert last.reused_tokens == 3 * BLOCK_TOKENS
    finally:
        s.close()


def test_blocks_count_in_the_kv_budget(models):
    """Blocks in memory are K/V bytes: admission evicts them (least recently used: the chain's
    end) to make room for a row, and the row's own blocks never pass the budget either."""
    s = Scheduler(models["windowed"], max_idle=0, max_batch=1)
    try:
        system, turn = system_and_turn(s.tokenizer, 1)
        run(s, system + turn)
        held = s.stats()["block_bytes"]
        assert held and s.stats()["kv_bytes"] == held
        s.kv_budget = s.row_bytes + held // 2
        second = system + system_and_turn(s.tokenizer, 2)[1]
        got, last = run(s, second)
        assert 0 < last.reused_tokens < SYSTEM and s.stats()["kv_bytes"] <= s.kv_budget
        assert got == run(s, second, reuse=False)[0]
    finally:
        s.close()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_blocks_come_back_bit_for_bit(tmp_path, dtype):
    """A Mac's float16 / bfloat16 K/V (numpy has no bfloat16: stored as their bits) read back by
    a new DiskCache on the same directory as the same values, in their dtype."""
    template = [[mx.zeros((1, 2, 4, 8), dtype=dtype)] * 2, [mx.zeros((1, 2, 3, 8), dtype=dtype)] * 2]
    block = [[(mx.random.normal(x.shape) * 100).astype(dtype) for x in arrays] for arrays in template]
    metadata = {"model": "m", "dtype": str(dtype)}
    disk = DiskCache(str(tmp_path), 1 << 20, metadata, template)
    disk.put("k", block)
    disk.close()
    got = DiskCache(str(tmp_path), 1 << 20, metadata, template).read("k")
    assert [[x.dtype for x in arrays] for arrays in got] == [[dtype] * 2] * 2
    for want, have in zip(block, got):
        for a, b in zip(want, have):
            assert np.array_equal(np.array(a.view(mx.uint16)), np.array(b.view(mx.uint16)))
