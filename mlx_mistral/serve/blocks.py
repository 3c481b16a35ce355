"""Blocks of K/V keyed by a hash chain: any request reuses the longest prefix any earlier one left.

The K/V of a token depend on every token before it, so a block (BLOCK_TOKENS tokens) is keyed
by the chain key(i) = blake2b(key(i - 1), tokens of block i), key(-1) a seed naming the model and
the cache layout (chain()): two models, dtypes, KV quantizations or windows never share one.
A request computes its chain and looks up one key per block boundary, longest first (find).

Rolling buffers. K/V are cached after RoPE, so position p's are only valid at p: a prefix
starts at 0, so a block ending at e always goes back to positions [e - B, e). A cache group of C
slots holds position p in slot p % C and, once fed up to m, needs only positions [m - C, m).
So a block keeps, per group, only its last kept = min(B, C) positions, and restoring m tokens
(restore) writes, for each group, positions [max(0, m - C), m) into slots p % C from the blocks
ending in (m - C, m] (a block's kept positions [e - kept, e), from max(m - C, e - kept) on),
then sets the offset to m. Example, C = 64, B = 128, m = 1024: one block, the one ending at
1024, holds positions 960..1023, written to slots 0..63. A windowed model's blocks are thus
bounded by its window whatever the prefix, and a 4k-token prefix under a 64-token window
needs one 64-position block. Capture is the other way (capture): a block ending at e can be
copied from a row fed up to offset o while its kept positions are in the buffer, i.e.
o - e <= C - kept (room() keeps prefill chunks short enough that each boundary passes that way).
"""

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..cache import RollingKVCache
from ..layered_cache import KVCache, LayeredKVCache
from .disk_cache import DiskCache

# Tokens per block. A shared prefix is reused up to its last multiple of 128: at most 127 of its
# tokens are prefilled again (a quarter of a 512-token prefill chunk), while an 8k-token prefix is
# 64 keys to look up and 64 files of 16 MiB for Mistral 7B's float16 K/V (128 KiB a token).
BLOCK_TOKENS = 128

Block = list[list[mx.array]]  # per cache group: RollingKVCache.span's arrays for its kept positions


def groups(cache: KVCache) -> list[RollingKVCache]:
    """The rolling caches of `cache`: a LayeredKVCache's groups, or the cache itself."""
    return cache.groups if isinstance(cache, LayeredKVCache) else [cache]


def chain(seed: bytes, tokens: list[int]) -> list[str]:
    """The key of each whole block of `tokens` (hex): key i names tokens [0, (i + 1) * B)."""
    keys, h = [], seed
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        block = np.asarray(tokens[end - BLOCK_TOKENS:end], dtype="<u4").tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        keys.append(h.hex())
    return keys


def nbytes(block: Block) -> int:
    return sum(x.nbytes for arrays in block for x in arrays)


@dataclass
class Found:
    """A prompt's longest cached prefix: its first `tokens` tokens, from `blocks` (by end position)."""

    tokens: int
    blocks: dict[int, Block]


class BlockStore:
    """The memory tier: blocks by key, least recently used first, at most `max_bytes`; under it
    the disk tier (a DiskCache of `disk_bytes` in `directory`), if any. `new_cache(roll)` makes
    an empty one-row cache (the one restore fills); `identity` names the model
    (disk_cache.model_identity). Only the model thread calls it. A chain's first blocks are
    touched last, so the LRU cuts chains from their ends and a shared system prompt stays longest."""

    def __init__(self, new_cache: Callable[[bool], KVCache], identity: str, max_bytes: int,
                 directory: str | None = None, disk_bytes: int = 0):
        self.new_cache, self.max_bytes = new_cache, max_bytes
        template = groups(new_cache(False))
        self.windows = [g.window for g in template]
        self.kept = [min(BLOCK_TOKENS, w) for w in self.windows]
        self.slack = min(w - k for w, k in zip(self.windows, self.kept))
        g = template[0]
        metadata = dict(model=identity, dtype=str(g.dtype), kv_bits=str(g.bits), kv_group_size=str(g.group_size),
                        block_tokens=str(BLOCK_TOKENS), windows=str(self.windows))
        self.seed = hashlib.blake2b(repr(sorted(metadata.items())).encode(), digest_size=16).digest()
        self.disk = DiskCache(directory, disk_bytes, metadata, [g.span(0, 0, k) for g, k in zip(template, self.kept)]
                              ) if directory else None
        self._blocks: OrderedDict[str, Block] = OrderedDict()  # LRU first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.disk is not None

    def stats(self) -> dict:
        """Blocks and bytes in each tier (for /metrics)."""
        disk = self.disk
        return dict(blocks=len(self), block_bytes=self.nbytes, disk_blocks=len(disk) if disk is not None else 0,
                    disk_bytes=disk.nbytes if disk is not None else 0)

    def room(self, offset: int) -> int:
        """How many tokens a prefill chunk may feed from `offset` so that the next block
        boundary e is captured before its kept positions leave the buffer (o - e <= slack)."""
        return (offset // BLOCK_TOKENS + 1) * BLOCK_TOKENS + self.slack - offset

    def capture(self, cache: KVCache, row: int, tokens: list[int]) -> int:
        """Keep the blocks of row `row` of `cache`, which was fed `tokens`, that are still in
        its buffer (copies: the cache may go), and touch those of `tokens` already kept: the
        longest first, so that the shortest end up the most recently used. Returns the tokens
        of the blocks it kept anew."""
        if not self.enabled:
            return 0
        keys, new = chain(self.seed, tokens), []
        for i in reversed(range(len(keys))):
            end = (i + 1) * BLOCK_TOKENS
            if keys[i] in self._blocks:
                self._blocks.move_to_end(keys[i])
            elif len(tokens) - end <= self.slack:  # its kept positions are in the buffer
                new.append((keys[i], [g.span(row, end - k, end) for g, k in zip(groups(cache), self.kept)]))
                self._add(*new[-1])
        mx.eval([block for _, block in new])
        if self.disk is not None:
            for key, block in new:
                self.disk.put(key, block)
        self._trim()
        return len(new) * BLOCK_TOKENS

    def find(self, tokens: list[int]) -> Found | None:
        """The longest prefix of `tokens` but its last token (always fed) whose blocks are all
        here or on disk: one lookup per boundary, longest first. Blocks read from disk join
        the memory tier; a bad file is skipped (DiskCache.read) and a shorter prefix tried."""
        if not self.enabled:
            return None
        keys = chain(self.seed, tokens[:-1])
        for i in reversed(range(len(keys))):
            if not self._has(keys[i]):
                continue
            end, found = (i + 1) * BLOCK_TOKENS, {}
            for j in reversed(range(i + 1)):
                if (j + 1) * BLOCK_TOKENS <= end - max(self.windows):
                    return Found(end, found)  # older blocks are out of every group's window
                block = self._get(keys[j])
                if block is None:
                    break
                found[(j + 1) * BLOCK_TOKENS] = block
            else:
                return Found(end, found)
        return None

    def wait_for(self, tokens: list[int], prefilling: list[list[int]]) -> bool:
        """True when a prompt still being prefilled shares more whole blocks with `tokens` than
        are cached: waiting until they are (its prefill captures them) costs less than
        prefilling them twice, e.g. agents that start together with one system prompt."""
        if not self.enabled:
            return False
        keys = chain(self.seed, tokens[:-1])
        cached = next((i for i, key in enumerate(keys) if not self._has(key)), len(keys))
        for other in prefilling:
            shared = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))
            if min(shared, len(tokens) - 1) // BLOCK_TOKENS > cached:
                return True
        return False

    def restore(self, found: Found, roll: bool) -> KVCache:
        """A new one-row cache holding the K/V of the first found.tokens tokens."""
        cache, m = self.new_cache(roll), found.tokens
        for g, (group, kept) in enumerate(zip(groups(cache), self.kept)):
            lo = max(0, m - group.window)  # the group's first position needed
            # block `end` keeps positions [end - kept, end): each from lo on, in order
            parts = [[x[:, :, max(0, lo - (end - kept)):] for x in block[g]]
                     for end, block in sorted(found.blocks.items()) if end > lo]
            group.fill([mx.concatenate(arrays, axis=2) for arrays in zip(*parts)], lo)
        mx.eval(cache.keys, cache.values)
        return cache

    def evict(self) -> bool:
        """Drop the least recently used block from memory; False if there was none."""
        if not self._blocks:
            return False
        self.nbytes -= nbytes(self._blocks.popitem(last=False)[1])
        return True

    def close(self) -> None:
        """Drop the blocks in memory; write the pending ones to disk and end its writer."""
        self._blocks.clear()
        self.nbytes = 0
        if self.disk is not None:
            self.disk.close()

    def _has(self, key: str) -> bool:
        return key in self._blocks or (self.disk is not None and self.disk.has(key))

    def _get(self, key: str) -> Block | None:
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        block = self.disk.read(key) if self.disk is not None else None
        if block is not None:
            self._add(key, block)
            self._trim()  # the older blocks go first: `block` is the newest (and held by the caller)
        return block

    def _add(self, key: str, block: Block) -> None:
        self._blocks[key] = block
        self.nbytes += nbytes(block)

    def _trim(self) -> None:
        while self.nbytes > self.max_bytes and self.evict():
            pass
