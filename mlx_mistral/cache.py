"""The rolling-buffer KV cache: preallocated once, written in place, owned by the caller."""

import warnings

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .config import ModelArgs
from .errors import MistralError

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
    """K/V buffers of shape [B, n_kv_heads, C, head_dim] for every layer: C = capacity slots
    for a sliding window of W = `window` positions, C = W + `headroom` (speculation's drafts).

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
    A query at position i sees keys at j with i - W < j <= i (the sliding window of
    DESIGN.md section 3). Masks come from slot positions, so the order of the slots never
    matters: softmax does not care about key order.

    Headroom makes rollback free: a verify step writes its 1 + k tokens at positions
    P..P+k (k <= headroom), overwriting positions P+t-C <= P-W that no query from P on
    sees; moving a row's offset back (`rewind`) leaves the rejected tokens in slots whose
    position, as the formula above reads it, is C earlier: at most offset - 1 - W, out of
    every later query's window, so masked. Nothing is copied.
    """

    def __init__(self, args: ModelArgs, window: int, batch_size: int = 1,
                 dtype: mx.Dtype = mx.float32, warn_on_roll: bool = False,
                 bits: int | None = None, group_size: int = 64, n_layers: int | None = None,
                 headroom: int = 0):
        check_kv_quantization(args, bits, group_size, dtype)
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.window, self.capacity = window, window + headroom
        shape = (batch_size, args.n_kv_heads, self.capacity)
        n_layers = n_layers or args.n_layers  # fewer: a group of a LayeredKVCache
        self.keys = [self._zeros(shape, args.head_dim) for _ in range(n_layers)]
        self.values = [self._zeros(shape, args.head_dim) for _ in range(n_layers)]
        mx.eval(self.keys, self.values)
        self.offsets = [0] * batch_size  # absolute position of each row's next token
        self._warn_on_roll = warn_on_roll

    @property
    def headroom(self) -> int:
        """Tokens past the window a step may write and take back (a step writes 1 + headroom at most)."""
        return self.capacity - self.window

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
        if len({(c.window, c.capacity, c.dtype, c.bits, c.group_size) for c in (self, *others)}) != 1:
            raise ValueError("caches to stack must have the same window, capacity, dtype and quantization")
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
        """A cache with this one's window, capacity, dtype and quantization over other buffers."""
        out = self.__class__.__new__(self.__class__)
        out.bits, out.group_size, out.dtype = self.bits, self.group_size, self.dtype
        out.window, out.capacity = self.window, self.capacity
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
        """Tokens currently attended to (by the fullest row): at most the window."""
        return min(max(self.offsets), self.window)

    def slot_positions(self) -> mx.array:
        """Absolute position held by each slot, negative where the slot is empty. Shape [C]."""
        last = self.offset - 1
        return last - (last - mx.arange(self.capacity)) % self.capacity

    def mask(self, length: int) -> mx.array | str | None:
        """Attention mask for the next `length` tokens, shared by every layer.

        A step of at most 1 + headroom tokens a row (decode, a verify, a short chunk) writes
        them first, then attends to the slots in use: see _step_mask. A longer chunk (one
        position for every row) attends to [slots in use, chunk] (see update_and_fetch: the
        same keys in the same order whether the chunk is written first, when it does not wrap,
        or after); its rows are queries q = offset + i. Until the buffer wraps, slots [0, n)
        hold positions [0, n), so those are a prefix of the buffer.
        """
        if length - 1 <= self.headroom:
            return self._step_mask(length)
        W, start = self.window, self.offset
        if start == 0 and length <= W:
            return "causal"
        i = mx.arange(length)[:, None]
        j = mx.arange(length)[None]
        chunk = (j <= i) & (j > i - W)  # causal, within the window
        if start == 0:
            return chunk
        k = self.slot_positions()[None, : min(start, self.capacity)]  # all < q
        return mx.concatenate([k > start + i - W, chunk], axis=1)

    def layer_masks(self, length: int) -> list:
        """mask(length) for each layer: one mask, built once, since all share the window."""
        return [self.mask(length)] * len(self.keys)

    def _step_mask(self, length: int) -> mx.array | None:
        """[B, 1, length, n] over the n slots in use once each row's tokens are written: slot s
        holds held = p - (p - s) mod C, p the row's last new position, seen by query q when
        q - W < held <= q. None where every query sees every slot in use (one token, not a
        ragged batch, every slot in the window). Each query sees at least its own token (slot
        q % C holds q): a row of all False would make the GPU's fused attention return NaN."""
        if length == 1 and not self.ragged and (self.headroom == 0 or self.offset < self.window):
            return None
        C, n = self.capacity, self._in_use(length)
        first = mx.array(self.offsets)[:, None, None]  # [B, 1, 1]
        q = first + mx.arange(length)[None, :, None]  # [B, L, 1]
        last = first + length - 1
        held = last - (last - mx.arange(n)[None, None]) % C  # [B, 1, n]
        return ((held <= q) & (held > q - self.window) & (held >= 0))[:, None]

    def _in_use(self, length: int) -> int:
        """Slots that hold a token once the next `length` tokens are written (fullest row)."""
        return min(max(self.offsets) + length, self.capacity)

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> tuple[Buffer, Buffer]:
        """Store this step's keys/values (already RoPE'd) and return what to attend to:
        float arrays, or quantized triples (the new tokens too, as they are stored)."""
        length = k.shape[2]
        k, v = self.quantize(k), self.quantize(v)
        if length - 1 <= self.headroom:  # write first (see the class docstring), attend to the slots in use
            if self.ragged:  # each row writes its own slots
                rows = mx.arange(len(self.offsets))[:, None]
                slots = (mx.array(self.offsets)[:, None] + mx.arange(length)[None]) % self.capacity
                for buf, x in self._pairs(layer, k, v):
                    buf[rows, :, slots] = x.transpose(0, 2, 1, 3)  # [B, L, heads, .] at [rows, slots]
            else:
                self._write(layer, k, v, self.offset)
            n = self._in_use(length)
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
        """Row `row`'s K/V at positions [start, end), which must be in the row's window (its
        last W): each of _arrays()'s, as [1, n_kv_heads, end - start, ...] copies."""
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
        if self._warn_on_roll and max(self.offsets) + length > self.window:
            warnings.warn(
                f"context passed the KV cache capacity ({self.window} tokens); continuing as a "
                f"sliding window of the last {self.window} tokens (raise --max-kv-size to keep more)",
                stacklevel=3,
            )
            self._warn_on_roll = False
        self.offsets = [o + length for o in self.offsets]

    def rewind(self, counts: list[int]) -> None:
        """Take back the last counts[b] tokens of row b (its rejected drafts, at most the
        headroom): only the offsets move (see the class docstring)."""
        if any(not 0 <= n <= self.headroom for n in counts):
            raise ValueError(f"a row can take back 0 to {self.headroom} tokens, got {counts}")
        self.offsets = [o - n for o, n in zip(self.offsets, counts)]
