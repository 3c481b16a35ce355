"""GGUF files holding types MLX's own reader gets wrong or refuses: K-quants (Q4_K_M, Q6_K: the
most common on the Hub), IQ types, Q5_0/Q5_1, BF16; often beside Q4_0/Q8_0 tensors (llama.cpp's
Q4_0 files keep output.weight in Q6_K). mx.load reads F32, F16, Q4_0, Q4_1 and Q8_0 exactly,
but turns BF16 into float16 (out of range below 6e-8), Q4_K into float16 values that are not
gguf's (0.5 off on weights of 0.6, random blocks) and fails on Q5_K, Q3_K, Q5_0 and IQ types.
So `tensor_types` reads the header first, and any other type sends the file here, to the `gguf`
package's reader (transformers' too):

- Q4_0, Q4_1 and Q8_0 blocks are repacked into MLX's affine triples, exactly as MLX's reader
  does (a block of 32 weights w = d * q + m: scale d, bias m; Q4_0's m = -8d, Q8_0's int8
  q + 128 with m = -128d); no value changes.
- F32/F16/BF16 as they are.
- Every other type the gguf package dequantizes is dequantized to float32, then requantized to
  MLX affine `bits` (4 or 8, group 32) or kept as float16 (bits=16).
"""

import mmap
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from ..errors import MistralError

Q = gguf.GGMLQuantizationType
AS_STORED = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
GGUF_BITS_HELP = ("a GGUF's K-quant/IQ/Q5 tensors become MLX 4/8-bit or float16 "
                  "(default: 4 from types of <= 4.5 bits a weight, else 8); Q4_0/Q4_1/Q8_0 stay as stored")
MLX_READS = (Q.F32, Q.F16, *AS_STORED)  # exactly; mx.load is 30x faster than gguf's reader on SmolLM2
FLOATS = {Q.F32: np.float32, Q.F16: np.float16}
GROUP = 32  # the block of Q4_0, Q4_1 and Q8_0, and the group of every requantized tensor
NARROW = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
          Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, Q.MXFP4)  # <= 4.5 bits a weight: 4-bit by default
V = gguf.GGUFValueType
SIZES = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
         V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}


def tensor_types(path: Path) -> dict[str, Q]:
    """Each tensor's type, from the header alone (the metadata values skipped, not parsed: the
    gguf package's reader takes 3 s to parse SmolLM2's 98k tokenizer strings, this 0.04 s)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str) -> tuple:
            nonlocal pos
            out = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return out

        def skip_string() -> None:
            nonlocal pos
            (length,) = take("Q")  # its bytes follow their u64 length
            pos += length

        try:
            _, version, n_tensors, n_kv = take("4sIQQ")
            if version not in (2, 3):
                raise MistralError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
            for _ in range(n_kv):
                skip_string()
                kind = V(take("I")[0])
                if kind == V.ARRAY:
                    kind, count = V(take("I")[0]), take("Q")[0]
                    for _ in range(count) if kind == V.STRING else ():
                        skip_string()
                    pos += 0 if kind == V.STRING else SIZES[kind] * count
                elif kind == V.STRING:
                    skip_string()
                else:
                    pos += SIZES[kind]
            types = {}
            for _ in range(n_tensors):
                start = pos + 8
                skip_string()
                name = bytes(m[start:pos]).decode()
                (dims,) = take("I")
                pos += 8 * dims
                types[name] = Q(take("I")[0])
                pos += 8  # offset
        except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
            raise MistralError(f"{path}: GGUF file could not be read (its header is truncated or corrupt: "
                               f"{e})") from None
    return types


def unreadable(path: Path, error: Exception) -> MistralError:
    """The one-line error for a GGUF file a reader gave up on."""
    return MistralError(f"{path}: GGUF file could not be read ({' '.join(str(error).split())[:200]})")


def read_with_gguf(path: Path, bits: int | None) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """(tensors named as mx.load names them, metadata) of the GGUF file at `path`; tensors of
    types MLX cannot read are requantized to `bits` (4, 8; 16 keeps float16; None: 4 for types
    of at most 4.5 bits a weight, else 8), and a warning says so."""
    try:
        reader = gguf.GGUFReader(str(path))
        raw = [(t.name, t.tensor_type, tuple(int(n) for n in reversed(t.shape)), t.data) for t in reader.tensors]
        meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # truncated, a corrupt header, a type the gguf package does not know
        raise unreadable(path, e) from None
    tensors, redone = {}, Counter()
    for name, qtype, shape, data in raw:
        stem = name.removesuffix(".weight")
        if qtype in FLOATS:
            tensors[name] = mx.array(np.asarray(data, FLOATS[qtype]).reshape(shape))
        elif qtype == Q.BF16:
            tensors[name] = mx.array(np.asarray(data).view(np.uint16).reshape(shape)).view(mx.bfloat16)
        elif qtype in AS_STORED:
            tensors[name], tensors[f"{stem}.scales"], tensors[f"{stem}.biases"] = _repack(np.asarray(data), qtype, shape)
        else:
            try:
                w = gguf.quants.dequantize(np.asarray(data), qtype).reshape(shape)
            except NotImplementedError:
                raise MistralError(f"{path}: tensor {name!r} has type {qtype.name}, which the gguf package "
                                   "cannot dequantize") from None
            width = bits or (4 if qtype in NARROW else 8)
            if width == 16:  # (every block type spans a multiple of 32 weights of a row)
                tensors[name] = mx.array(w.astype(np.float16))
            else:
                tensors[name], tensors[f"{stem}.scales"], tensors[f"{stem}.biases"] = mx.quantize(
                    mx.array(w), GROUP, width)
            mx.eval(tensors[name])
            redone[qtype.name, width] += 1
    for (qtype, width), n in sorted(redone.items()):
        after = "kept as float16" if width == 16 else f"requantized to MLX {width}-bit, group {GROUP}"
        warnings.warn(f"{path}: {n} {qtype} tensors dequantized (gguf) and {after}", stacklevel=3)
    return tensors, meta


def _value(field: gguf.ReaderField) -> Any:
    """A metadata value as mx.load gives it: scalars and strings as Python values, arrays of
    numbers as arrays (numpy here), arrays of strings as lists."""
    value = field.contents()
    if isinstance(value, list) and field.types[-1] != V.STRING:
        return np.array(value)
    return value


def _repack(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> tuple[mx.array, mx.array, mx.array]:
    """A Q4_0/Q4_1/Q8_0 tensor's blocks (rows of bytes) -> MLX's (weight uint32, scales, biases)."""
    rows, n_blocks = int(np.prod(shape[:-1])), shape[-1] // GROUP
    blocks = data.reshape(rows, n_blocks, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == Q.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        m = np.float16(-128) * d
    else:
        packed = blocks[..., 4:] if qtype == Q.Q4_1 else blocks[..., 2:]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if qtype == Q.Q4_1 else np.float16(-8) * d
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # weights 0-15 low, 16-31 high nibbles
        q = values[..., 0::2] | (values[..., 1::2] << 4)  # MLX: consecutive weights, low nibble first
    weight = np.ascontiguousarray(q).reshape(*shape[:-1], -1).view(np.uint32)
    return (mx.array(weight), mx.array(d.reshape(*shape[:-1], n_blocks)),
            mx.array(m.reshape(*shape[:-1], n_blocks)))
