"""llama.cpp's own converter (convert_hf_to_gguf.py), to write GGUF files exactly as llama.cpp
writes them from a transformers-written checkpoint. It comes from llama-cpp-python's source
distribution (its vendor/llama.cpp: the script, its `conversion` package and the `gguf-py` it
imports), fetched by `pip download` from the package index pip is configured with; nothing is
built. Fetched once (about a minute) into ~/.cache/mlx-mistral.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's; its llama.cpp writes mistral3 and stacked Mixtral experts
ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-mistral" / f"llama.cpp-{VERSION}"
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    """The directory holding convert_hf_to_gguf.py (downloaded and extracted on first use)."""
    if (ROOT / "convert_hf_to_gguf.py").exists():
        return ROOT
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True, timeout=900)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(PARTS)]
            tar.extractall(tmp, members=members, filter="data")
        ROOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / prefix), str(ROOT))  # whole or not at all
    return ROOT


def convert_to_gguf(src: Path, out: Path, outtype: str = "f32") -> Path:
    """`src` (a Hugging Face directory) -> `out`, by llama.cpp's converter (`outtype` f32, f16, q8_0...)."""
    root = converter()
    proc = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root / "gguf-py")})
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py {src} failed:\n{proc.stderr[-3000:]}")
    return out
