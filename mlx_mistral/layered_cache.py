"""A model's KV cache: one rolling buffer, or one per layer window seen as one cache (make_cache)."""

import mlx.core as mx

from .cache import Buffer, RollingKVCache
from .config import ModelArgs
from .errors import MistralError


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

    def __init__(self, groups: list[RollingKVCache], layers: list[list[int]]):
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
    def window(self) -> int:
        """The window of the widest layers."""
        return max(group.window for group in self.groups)

    @property
    def headroom(self) -> int:
        return self.groups[0].headroom

    @property
    def size(self) -> int:
        """Tokens currently held by the widest layers (fullest row)."""
        return max(group.size for group in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @property
    def keys(self) -> list[Buffer]:
        """Each model layer's key buffer (to evaluate them all)."""
        return [self.groups[g].keys[i] for _, g, i in self._where]

    @property
    def values(self) -> list[Buffer]:
        return [self.groups[g].values[i] for _, g, i in self._where]

    def layer_masks(self, length: int) -> list:
        """Each model layer's mask for the next `length` tokens: one per group, built once."""
        masks = [group.mask(length) for group in self.groups]
        return [masks[g] for _, g, _ in self._where]

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> tuple[Buffer, Buffer]:
        _, g, i = self._where[layer]
        return self.groups[g].update_and_fetch(i, k, v)

    def advance(self, length: int) -> None:
        for group in self.groups:
            group.advance(length)

    def rewind(self, counts: list[int]) -> None:
        for group in self.groups:
            group.rewind(counts)

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


KVCache = RollingKVCache | LayeredKVCache  # what make_cache returns, and the model takes


def kv_slots(args: ModelArgs, max_kv_size: int | None = None) -> list[int]:
    """Each layer's KV cache slots: its sliding window, or max_position_embeddings for a
    full-attention layer, capped at max_kv_size."""
    if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size <= 0):
        raise MistralError(f"max_kv_size must be a positive integer, got {max_kv_size!r}")
    full = args.max_position_embeddings
    return [min(window or full, max_kv_size or window or full) for window in args.windows]


def make_cache(args: ModelArgs, max_kv_size: int | None = None, batch_size: int = 1,
               dtype: mx.Dtype = mx.float32, kv_bits: int | None = None,
               kv_group_size: int = 64, warn_on_roll: bool = True, headroom: int = 0) -> KVCache:
    """A cache for `args`: the sliding window, or a smaller one when max_kv_size is smaller.

    kv_bits (8 or 4) stores keys and values quantized in groups of kv_group_size along
    head_dim (None: `dtype` floats). `headroom`: slots past each window for the drafts a
    speculative step verifies and may take back (RollingKVCache.rewind).

    A windowless model gets max_kv_size slots (default: max_position_embeddings) and rolls
    past them with a one-time warning (unless warn_on_roll is False), since that changes its
    output. With per-layer windows (args.layer_windows), each layer gets the slots of its
    own window (kv_slots) and the layers of each window share one RollingKVCache: a
    LayeredKVCache of them (one RollingKVCache when every layer has the same window).
    """
    if not isinstance(headroom, int) or headroom < 0:
        raise MistralError(f"headroom must be an integer >= 0, got {headroom!r}")
    groups: dict[int, list[int]] = {}  # window -> its layers
    for layer, window in enumerate(kv_slots(args, max_kv_size)):
        groups.setdefault(window, []).append(layer)
    caches = []
    for window, layers in groups.items():
        # it rolls, changing the output, where it holds less than one of its layers' windows
        rolls = any(args.windows[i] is None or window < args.windows[i] for i in layers)
        caches.append(RollingKVCache(args, window, batch_size, dtype, warn_on_roll=warn_on_roll and rolls,
                                     bits=kv_bits, group_size=kv_group_size, n_layers=len(layers),
                                     headroom=headroom))
    return caches[0] if len(caches) == 1 else LayeredKVCache(caches, list(groups.values()))
