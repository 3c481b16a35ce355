"""Use OpenBLAS on Linux when it is installed.

MLX's Linux CPU wheel links a slow reference BLAS; Debian's OpenBLAS loaded
with RTLD_GLOBAL before `mlx` is first imported makes matrix products ~40x
faster. Set MLX_MISTRAL_NO_OPENBLAS=1 to opt out. On macOS this does nothing.
"""

import ctypes
import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def preload() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("MLX_MISTRAL_NO_OPENBLAS"):
        return False
    if "mlx.core" in sys.modules or not os.path.exists(OPENBLAS):
        return False
    ctypes.CDLL(OPENBLAS, mode=ctypes.RTLD_GLOBAL)
    return True


ACTIVE = preload() or "openblas" in os.environ.get("LD_PRELOAD", "")
