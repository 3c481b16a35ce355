"""The rolling-buffer KV cache: preallocated once, written in place, owned by the caller."""

import warnings

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .config import ModelArgs
from .errors import MistralError
from .layered_cache import LayeredKVCache

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # those mx.quantize supports
KV_DTYPES = (mx.float16, mx.bfloat16, mx.float32)

# One layer's keys (or values): a float array, or MLX's affine quantized triple
# (codes packed in uint32, scales, biases: one scale and bias per group along head_dim).
Buffer = mx.array | tuple[mx.array, mx.array, mx.array]


def check_kv_bits(bits: int | None, group_size: int) -> None:
    """The checks that need no model (CLIs run them before loading one)."""
    if bits is None:
        return
    if bits not in KV_BITS or isinstance(bits, bool):
        raise MistralError(f"kv_bits must be 4 or 8 (or None for a float cache), got {bits!r}")
    if group_size not in KV_GROUP_SIZES:
        raise MistralError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size!r}")


def check_kv_quantization(args: ModelArgs, bits: int | None, group_size: int, dtype: mx.Dtype) -> None:
    """One clear error for a quantized-cache setting MLX cannot do."""
    check_kv_bits(bits, group_size)
    if bits is None:
        return
    if args.head_dim % group_size:
        raise MistralError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))} and divide "
                           f"head_dim ({args.head_dim}), got {group_size!r}")
    if dtype not in KV_DTYPES:
        raise MistralError(f"a quantized KV cache keeps its scales in float16, bfloat16 or float32, got {dtype}")


def _leaves(buffer: Buffer) -> tuple[mx.array, ...]:
    return buffer if isinstance(buffer, tuple) else (buffer,)


class RollingKVCache:
    """K/V buffers of shape [B, n_kv_heads, C, head_dim] for every layer, C = capacity.

    With `bits` (8 or 4) each buffer is quantized instead, as mx.quantize lays it out:
    codes [B, n_kv_heads, C, head_dim * bits / 32] (uint32) plus scales and biases
    [B, n_kv_heads, C, head_dim / group_size] in `dtype`. Every operation below treats
    the three arrays of a quantized buffer exactly as the one array of a float buffer
    (they share the slot axis), so the slot arithmetic and masks are the same.

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
                 dtype: mx.Dtype = mx.float32, warn_on_roll: bool = False,
                 bits: int | None = None, group_size: int = 64, n_layers: int | None = None):
        check_kv_quantization(args, bits, group_size, dtype)
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        shape = (batch_size, args.n_kv_heads, capacity)
        n_layers = n_layers or args.n_layers  # fewer: a group of a LayeredKVCache
        self.keys = [self._zeros(shape, args.head_dim) for _ in range(n_layers)]
        self.values = [self._zeros(shape, args.head_dim) for _ in range(n_layers)]
        mx.eval(self.keys, self.values)
        self.capacity = capacity
        self.offsets = [0] * batch_size  # absolute position of each row's next token
        self._warn_on_roll = warn_on_roll

    def _zeros(self, shape: tuple[int, ...], head_dim: int) -> Buffer:
        if self.bits is None:
            return mx.zeros((*shape, head_dim), self.dtype)
        groups = head_dim // self.group_size
        return (mx.zeros((*shape, head_dim * self.bits // 32), mx.uint32),
                mx.zeros((*shape, groups), self.dtype), mx.zeros((*shape, groups), self.dtype))

    def quantize(self, x: mx.array) -> Buffer:
        """New keys or values [B, n_kv_heads, L, head_dim] in this cache's storage format."""
        if self.bits is None:
            return x
        return tuple(mx.quantize(x.astype(self.dtype), group_size=self.group_size, bits=self.bits))

    @classmethod
    def stack(cls, caches: "list[RollingKVCache]") -> "RollingKVCache":
        """One batch cache from single-row caches (a ragged batch: rows keep their positions)."""
        first = caches[0]
        out = first._like(list(first.keys), list(first.values), list(first.offsets))
        out.extend(*caches[1:])
        return out

    def extend(self, *others: "RollingKVCache") -> None:
        """Append the rows of `others` (their buffers are copied: they can go)."""
        if len({(c.capacity, c.dtype, c.bits, c.group_size) for c in (self, *others)}) != 1:
            raise ValueError("caches to stack must have the same capacity, dtype and quantization")
        self._replace(lambda *xs: mx.concatenate(xs, axis=0), *others)
        self.offsets = self.offsets + [o for c in others for o in c.offsets]
        self._warn_on_roll = any(c._warn_on_roll for c in (self, *others))

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows` (finished sequences)."""
        index = mx.array(rows, dtype=mx.int32)
        self._replace(lambda x: x[index])
        self.offsets = [self.offsets[r] for r in rows]

    def _replace(self, fn, *others: "RollingKVCache") -> None:
        """Each array x of each layer becomes fn(x, the same array of each of `others`), one
        layer at a time: the old and new arrays of one layer are alive together, never a
        second copy of the whole cache (a batch's KV can be most of the memory)."""
        for buffers, theirs in ((self.keys, [c.keys for c in others]), (self.values, [c.values for c in others])):
            for i in range(len(buffers)):
                buffers[i] = tree_map(fn, buffers[i], *(t[i] for t in theirs))
                mx.eval(buffers[i])

    def rows(self, rows: list[int]) -> "RollingKVCache":
        """A copy of batch rows `rows` (its own buffers: the batch's can go)."""
        index = mx.array(rows, dtype=mx.int32)
        out = self._like(*tree_map(lambda x: x[index], (self.keys, self.values)), [self.offsets[r] for r in rows])
        mx.eval(out.keys, out.values)
        return out

    def _like(self, keys: list[Buffer], values: list[Buffer], offsets: list[int]) -> "RollingKVCache":
        """A cache with this one's capacity, dtype and quantization over other buffers."""
        out = self.__class__.__new__(self.__class__)
        out.bits, out.group_size, out.dtype, out.capacity = self.bits, self.group_size, self.dtype, self.capacity
        out._warn_on_roll, out.keys, out.values, out.offsets = self._warn_on_roll, keys, values, offsets
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
        """Bytes allocated for keys and values (codes, scales and biases when quantized),
        fixed for the cache's lifetime."""
        return sum(x.nbytes for _, x in tree_flatten((self.keys, self.values)))

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
        [slots in use, chunk] (see update_and_fetch: the same keys in the same order
        whether the chunk is written first, when it does not wrap, or after); its rows
        are queries q = offset + i.
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

    def layer_masks(self, length: int) -> list:
        """mask(length) for each layer: one mask, built once, since all share the capacity."""
        return [self.mask(length)] * len(self.keys)

    def _decode_mask(self) -> mx.array | None:
        """Slots in use after this step's write all hold one of the last C positions of a
        row, except in a ragged batch, where a shorter row may not fill them yet."""
        if not self.ragged:
            return None
        C, p = self.capacity, mx.array(self.offsets)[:, None]
        held = p - (p - mx.arange(self._in_use(1))[None]) % C  # position in slot s (after the write)
        # Each row sees at least its own token (slot p % C holds p): a row of all False would
        # make the GPU's fused attention return NaN.
        return (held >= 0)[:, None, None, :]  # [B, 1, 1, n]: one row of keys per sequence

    def _in_use(self, length: int) -> int:
        """Slots that hold a token once the next `length` tokens are written (fullest row)."""
        return min(max(self.offsets) + length, self.capacity)

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> tuple[Buffer, Buffer]:
        """Store this step's keys/values (already RoPE'd) and return what to attend to:
        float arrays, or quantized triples (the new tokens too, as they are stored)."""
        length = k.shape[2]
        k, v = self.quantize(k), self.quantize(v)
        if length == 1:
            if self.ragged:  # each row writes its own slot
                rows, slots = mx.arange(len(self.offsets)), mx.array(self.offsets) % self.capacity
                for buf, x in self._pairs(layer, k, v):
                    buf[rows, :, slots] = x[:, :, 0]
            else:
                self._write(layer, k, v, self.offset)
            n = self._in_use(1)
            return tree_map(lambda x: x[:, :, :n], (self.keys[layer], self.values[layer]))
        start = self.offset
        if 0 < start and start + length <= self.capacity:
            # No wrap: slot s holds position s, so the slots [0, start + length) after the write
            # are [held, chunk] in order. Attend to them in place: no copy of the layer's K/V.
            self._write(layer, k, v, start)
            return tree_map(lambda x: x[:, :, :start + length], (self.keys[layer], self.values[layer]))
        keys, values = k, v
        if start:  # attend before writing: a wrapping chunk would overwrite its own past
            n = self._in_use(0)
            keys, values = tree_map(lambda held, new: mx.concatenate([held[:, :, :n], new], axis=2),
                                    (self.keys[layer], self.values[layer]), (k, v))
        C = self.capacity
        last = tree_map(lambda x: x[:, :, -C:], (k, v))
        self._write(layer, *last, start + max(0, length - C))
        return keys, values

    def _write(self, layer: int, k: Buffer, v: Buffer, position: int) -> None:
        """Write len <= C tokens starting at absolute `position` into their slots, in place."""
        for buf, x in self._pairs(layer, k, v):
            self._put(buf, x, position)

    def _put(self, buf: mx.array, x: mx.array, position: int) -> None:
        """Write x's len <= C tokens (axis 2) starting at absolute `position` into buf, in place."""
        start = position % self.capacity
        length = x.shape[2]
        n = min(length, self.capacity - start)  # before the wrap
        buf[:, :, start:start + n] = x[:, :, :n]
        if n < length:
            buf[:, :, : length - n] = x[:, :, n:]

    def _arrays(self) -> list[mx.array]:
        """Every stored array: each layer's keys, then each layer's values (a quantized buffer's three)."""
        return [x for buf in self.keys + self.values for x in _leaves(buf)]

    def span(self, row: int, start: int, end: int) -> list[mx.array]:
        """Row `row`'s K/V at positions [start, end), which must still be in the buffer (the
        last C of the row's): each of _arrays()'s, as [1, n_kv_heads, end - start, ...] copies."""
        slots = (mx.arange(start, end) % self.capacity).astype(mx.int32)
        return [x[row:row + 1][:, :, slots] for x in self._arrays()]

    def fill(self, arrays: list[mx.array], position: int) -> None:
        """Write `arrays` (span's, end - start <= C tokens) into this one-row cache at positions
        [position, end): it then holds them as if it had been fed up to `end`."""
        for buf, x in zip(self._arrays(), arrays):
            self._put(buf, x, position)
        self.offsets = [position + arrays[0].shape[2]]

    def _pairs(self, layer: int, k: Buffer, v: Buffer) -> zip:
        """(stored array, new array) for each array of a layer: 2 floats, or 2 x 3 quantized."""
        return zip(_leaves(self.keys[layer]) + _leaves(self.values[layer]), _leaves(k) + _leaves(v))

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
               kv_group_size: int = 64, warn_on_roll: bool = True) -> KVCache:
    """A cache for `args`: the sliding window, or fewer slots when max_kv_size is smaller.

    kv_bits (8 or 4) stores keys and values quantized in groups of kv_group_size along
    head_dim (None: `dtype` floats).

    A windowless model gets max_kv_size slots (default: max_position_embeddings) and rolls
    past them with a one-time warning (unless warn_on_roll is False), since that changes its
    output. With per-layer windows (args.layer_windows), each layer gets the slots of its
    own window (kv_slots) and the layers of each capacity share one RollingKVCache: a
    LayeredKVCache of them (one RollingKVCache when every layer has the same capacity).
    """
    groups: dict[int, list[int]] = {}  # capacity -> its layers
    for layer, capacity in enumerate(kv_slots(args, max_kv_size)):
        groups.setdefault(capacity, []).append(layer)
    caches = []
    for capacity, layers in groups.items():
        # it rolls, changing the output, where it holds less than one of its layers' windows
        rolls = any(args.windows[i] is None or capacity < args.windows[i] for i in layers)
        caches.append(RollingKVCache(args, capacity, batch_size, dtype, warn_on_roll=warn_on_roll and rolls,
                                     bits=kv_bits, group_size=kv_group_size, n_layers=len(layers)))
    return caches[0] if len(caches) == 1 else LayeredKVCache(caches, list(groups.values()))
