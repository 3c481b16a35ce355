"""Per-layer sliding windows: one rolling-buffer cache per layer capacity, seen as one cache."""

from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .cache import Buffer, RollingKVCache


class LayeredKVCache:
    """The caches of a model whose layers have different windows (Ministral 8B: one full
    attention layer in four): `groups[g]` holds the K/V of model layers `layers[g]`, with
    as many slots as their window (a full-attention layer: the request's max_kv_size).

    Each group is a plain RollingKVCache over its own layers, so its slot arithmetic and
    masks are those of a model with one window (DESIGN.md section 4): a query at i sees keys
    j with i - C_g < j <= i in group g's layers. Every group holds the same rows at the same
    positions, so offsets, RoPE positions and the row operations (rows, keep, extend,
    stack) are the groups', applied to each. It offers the interface of RollingKVCache
    that the model, generation and the server use.
    """

    def __init__(self, groups: "list[RollingKVCache]", layers: list[list[int]]):
        self.groups, self.layers = groups, layers
        # model layer -> (its group, its index in the group)
        self._where = sorted((layer, g, i) for g, ls in enumerate(layers) for i, layer in enumerate(ls))

    @property
    def bits(self) -> int | None:
        return self.groups[0].bits

    @property
    def group_size(self) -> int:
        return self.groups[0].group_size

    @property
    def dtype(self) -> mx.Dtype:
        return self.groups[0].dtype

    @property
    def offsets(self) -> list[int]:
        return self.groups[0].offsets

    @property
    def offset(self) -> int:
        return self.groups[0].offset

    @property
    def ragged(self) -> bool:
        return self.groups[0].ragged

    @property
    def rope_offset(self) -> int | mx.array:
        return self.groups[0].rope_offset

    @property
    def capacity(self) -> int:
        """The slots of the widest layers (a full-attention layer's: the request's context)."""
        return max(group.capacity for group in self.groups)

    @property
    def size(self) -> int:
        """Tokens currently held by the widest layers (fullest row)."""
        return max(group.size for group in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @property
    def keys(self) -> "list[Buffer]":
        """Each model layer's key buffer (to evaluate them all)."""
        return [self.groups[g].keys[i] for _, g, i in self._where]

    @property
    def values(self) -> "list[Buffer]":
        return [self.groups[g].values[i] for _, g, i in self._where]

    def layer_masks(self, length: int) -> list:
        """Each model layer's mask for the next `length` tokens: one per group, built once."""
        masks = [group.mask(length) for group in self.groups]
        return [masks[g] for _, g, _ in self._where]

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> "tuple[Buffer, Buffer]":
        _, g, i = self._where[layer]
        return self.groups[g].update_and_fetch(i, k, v)

    def advance(self, length: int) -> None:
        for group in self.groups:
            group.advance(length)

    def rows(self, rows: list[int]) -> "LayeredKVCache":
        """A copy of batch rows `rows` (its own buffers)."""
        return LayeredKVCache([group.rows(rows) for group in self.groups], self.layers)

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows`."""
        for group in self.groups:
            group.keep(rows)

    def extend(self, *others: "LayeredKVCache") -> None:
        """Append the rows of `others`, caches of the same model and max_kv_size."""
        if any(not isinstance(c, LayeredKVCache) or c.layers != self.layers for c in others):
            raise ValueError("caches to stack must group the same layers (the same model and max_kv_size)")
        for g, group in enumerate(self.groups):
            group.extend(*(c.groups[g] for c in others))

    @classmethod
    def stack(cls, caches: "list[LayeredKVCache]") -> "LayeredKVCache":
        """One batch cache from single-row caches (a ragged batch: rows keep their positions)."""
        first = caches[0]
        out = cls([type(group).stack([group]) for group in first.groups], first.layers)
        out.extend(*caches[1:])
        return out
