"""Reading safetensors files: one lazy array per tensor, the header checked against the file first."""

from pathlib import Path

import mlx.core as mx

from ..errors import MistralError


def load_safetensors(file: Path) -> dict[str, mx.array]:
    """Lazy arrays of a safetensors file, after checking its header against its size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            arrays = mx.load(str(file))
            # mx.load gives F8_E4M3 codes as uint8 (fp8.dequantize decodes them), as it does U8 tensors
            codes = [(k, f.get_slice(k).get_dtype()) for k, w in arrays.items() if w.dtype == mx.uint8]
    except FileNotFoundError:
        raise MistralError(f"{file}: weight file not found") from None
    except Exception as e:
        raise MistralError(f"{file}: not a valid safetensors file ({e})".replace("\n", " ")) from None
    for name, dtype in codes:
        if dtype != "F8_E4M3":
            raise MistralError(f"{file}: tensor '{name}' has dtype {dtype}, expected a float dtype (8-bit: F8_E4M3)")
    return arrays
