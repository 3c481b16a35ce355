"""The rolling-buffer KV cache: preallocated once, written in place, owned by the caller."""

import warnings

import mlx.core as mx

from .config import ModelArgs
from .errors import MistralError


class RollingKVCache:
    """K/V buffers of shape [B, n_kv_heads, C, head_dim] for every layer, C = capacity.

    Position p lives in slot p % C, so after `offset` tokens slot s holds position
        offset - 1 - ((offset - 1 - s) mod C)      (empty while that is < 0).
    Worked example, C = 4 after 6 tokens (positions 0..5):
        slot      0  1  2  3
        position  4  5  2  3
    A query at position i sees keys at j with i - C < j <= i (the sliding window of
    DESIGN.md section 3, with C = W). Masks come from slot positions, so the order of
    the slots never matters: softmax does not care about key order.
    """

    def __init__(self, args: ModelArgs, capacity: int, batch_size: int = 1,
                 dtype: mx.Dtype = mx.float32, warn_on_roll: bool = False):
        shape = (batch_size, args.n_kv_heads, capacity, args.head_dim)
        self.keys = [mx.zeros(shape, dtype) for _ in range(args.n_layers)]
        self.values = [mx.zeros(shape, dtype) for _ in range(args.n_layers)]
        mx.eval(self.keys, self.values)
        self.capacity = capacity
        self.offsets = [0] * batch_size  # absolute position of each row's next token
        self._warn_on_roll = warn_on_roll

    @classmethod
    def stack(cls, caches: "list[RollingKVCache]") -> "RollingKVCache":
        """One batch cache from single-row caches (a ragged batch: rows keep their positions)."""
        if len({(c.capacity, c.keys[0].dtype) for c in caches}) != 1:
            raise ValueError("caches to stack must have the same capacity and dtype")
        out = cls.__new__(cls)
        out.keys = [mx.concatenate(layer, axis=0) for layer in zip(*(c.keys for c in caches))]
        out.values = [mx.concatenate(layer, axis=0) for layer in zip(*(c.values for c in caches))]
        out.capacity, out._warn_on_roll = caches[0].capacity, any(c._warn_on_roll for c in caches)
        out.offsets = [o for c in caches for o in c.offsets]
        return out

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows` (finished sequences)."""
        index = mx.array(rows, dtype=mx.int32)
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.offsets = [self.offsets[r] for r in rows]

    def row(self, b: int) -> "RollingKVCache":
        """A one-row copy of row `b` (its own buffers: the batch's can go)."""
        out = self.__class__.__new__(self.__class__)
        index = mx.array([b], dtype=mx.int32)
        out.keys = [k[index] for k in self.keys]
        out.values = [v[index] for v in self.values]
        mx.eval(out.keys, out.values)
        out.capacity, out._warn_on_roll, out.offsets = self.capacity, self._warn_on_roll, [self.offsets[b]]
        return out

    @property
    def offset(self) -> int:
        """The position of the next token, shared by all rows."""
        if len(set(self.offsets)) > 1:
            raise ValueError("the rows of this cache are at different positions")
        return self.offsets[0]

    @property
    def ragged(self) -> bool:
        return len(set(self.offsets)) > 1

    @property
    def rope_offset(self) -> int | mx.array:
        """RoPE position of the next token: one int, or one per row for a ragged batch."""
        return mx.array(self.offsets) if self.ragged else self.offsets[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (fixed for the cache's lifetime)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    @property
    def size(self) -> int:
        """Tokens currently held (by the fullest row)."""
        return self._in_use(0)

    def slot_positions(self) -> mx.array:
        """Absolute position held by each slot, negative where the slot is empty. Shape [C]."""
        last = self.offset - 1
        return last - (last - mx.arange(self.capacity)) % self.capacity

    def mask(self, length: int) -> mx.array | str | None:
        """Attention mask for the next `length` tokens, shared by every layer.

        Only slots in use are attended to: until the buffer wraps, slots [0, n) hold
        positions [0, n), so those are a prefix of the buffer. Decode (length 1) writes
        its token first, then attends to the slots in use. A chunk attends to
        [slots in use, chunk] before it is written (see update_and_fetch); its rows are
        queries q = offset + i.
        """
        C = self.capacity
        if length == 1:
            return self._decode_mask()
        start = self.offset
        if start == 0 and length <= C:
            return "causal"
        i = mx.arange(length)[:, None]
        j = mx.arange(length)[None]
        chunk = (j <= i) & (j > i - C)  # causal, within the window
        if start == 0:
            return chunk
        k = self.slot_positions()[None, : min(start, C)]  # all >= 0, all < q
        return mx.concatenate([k > start + i - C, chunk], axis=1)

    def _decode_mask(self) -> mx.array | None:
        """Slots in use after this step's write all hold one of the last C positions of a
        row, except in a ragged batch, where a shorter row may not fill them yet."""
        if not self.ragged:
            return None
        C, p = self.capacity, mx.array(self.offsets)[:, None]
        held = p - (p - mx.arange(self._in_use(1))[None]) % C  # position in slot s (after the write)
        return (held >= 0)[:, None, None, :]  # [B, 1, 1, n]: one row of keys per sequence

    def _in_use(self, length: int) -> int:
        """Slots that hold a token once the next `length` tokens are written (fullest row)."""
        return min(max(self.offsets) + length, self.capacity)

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store this step's keys/values (already RoPE'd) and return what to attend to."""
        length = k.shape[2]
        if length == 1:
            if self.ragged:  # each row writes its own slot
                rows, slots = mx.arange(len(self.offsets)), mx.array(self.offsets) % self.capacity
                self.keys[layer][rows, :, slots] = k[:, :, 0]
                self.values[layer][rows, :, slots] = v[:, :, 0]
            else:
                self._write(layer, k, v, self.offset)
            n = self._in_use(1)
            return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]
        keys, values = k, v
        if self.offset:  # attend before writing: a wrapping chunk would overwrite its own past
            n = self._in_use(0)
            keys = mx.concatenate([self.keys[layer][:, :, :n], k], axis=2)
            values = mx.concatenate([self.values[layer][:, :, :n], v], axis=2)
        C = self.capacity
        self._write(layer, k[:, :, -C:], v[:, :, -C:], self.offset + max(0, length - C))
        return keys, values

    def _write(self, layer: int, k: mx.array, v: mx.array, position: int) -> None:
        """Write len <= C tokens starting at absolute `position` into their slots, in place."""
        start = position % self.capacity
        n = min(k.shape[2], self.capacity - start)  # before the wrap
        for buf, x in ((self.keys[layer], k), (self.values[layer], v)):
            buf[:, :, start:start + n] = x[:, :, :n]
            if n < x.shape[2]:
                buf[:, :, : x.shape[2] - n] = x[:, :, n:]

    def advance(self, length: int) -> None:
        """Called by the model once all layers have stored `length` new tokens."""
        if self._warn_on_roll and max(self.offsets) + length > self.capacity:
            warnings.warn(
                f"context passed the KV cache capacity ({self.capacity} tokens); continuing as a "
                f"sliding window of the last {self.capacity} tokens (raise --max-kv-size to keep more)",
                stacklevel=3,
            )
            self._warn_on_roll = False
        self.offsets = [o + length for o in self.offsets]


def make_cache(args: ModelArgs, max_kv_size: int | None = None, batch_size: int = 1,
               dtype: mx.Dtype = mx.float32) -> RollingKVCache:
    """A cache for `args`: the sliding window, or fewer slots when max_kv_size is smaller.

    A windowless model gets max_kv_size slots (default: max_position_embeddings) and rolls
    past them with a one-time warning, since that changes its output.
    """
    window = args.sliding_window or args.max_position_embeddings
    if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size <= 0):
        raise MistralError(f"max_kv_size must be a positive integer, got {max_kv_size!r}")
    capacity = min(window, max_kv_size or window)
    warn = args.sliding_window is None or capacity < args.sliding_window
    return RollingKVCache(args, capacity, batch_size, dtype, warn_on_roll=warn)
