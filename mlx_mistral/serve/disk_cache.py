"""The prefix cache's disk tier: blocks as safetensors files in one directory, at most max_bytes.

Threads. The model thread (the only one that calls MLX) turns a block into numpy arrays in put()
and numpy arrays back into MLX arrays in read(); one writer thread, which never calls MLX, writes
the files, each to a temporary name and then os.replace, so no half-written file ever has a
block's name. Float16 and bfloat16 arrays are stored as their raw bits (uint16: numpy has no
bfloat16), their dtype in the metadata.

A file is used only if its metadata (model identity, dtype, KV bits and group size, block size,
cache slots, its own key) and its tensors (names, shapes, dtypes) are what this server writes.
Otherwise (corrupt, truncated, another model's) it is skipped with one warning and deleted, and
the prompt is prefilled instead. Least recently used out first: a read touches the file's mtime
(atime is often not kept), and eviction (by the writer, before a file that would pass max_bytes)
goes by mtime, also across restarts.
"""

import hashlib
import os
import queue
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..errors import MistralError

SUFFIX = ".safetensors"
# Blocks handed to the writer and not written yet; past this, put() drops a block (it stays in memory).
MAX_PENDING_BYTES = 512 << 20
HALF = (mx.float16, mx.bfloat16)  # stored as uint16 bits

Block = list[list[mx.array]]  # blocks.Block


def model_identity(name: str, args: object, dtype: mx.Dtype, gguf_bits: int | None = None) -> str:
    """A name for the model that survives a restart: its args and dtype, what a GGUF's other
    types were requantized to (`gguf_bits`) and, for a local directory or file, its files' names
    and sizes (the config, the weights); otherwise (demo, a Hub repo id) its name."""
    path = Path(name).expanduser()
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file()) if path.is_dir() else \
        (path.name, path.stat().st_size) if path.is_file() else name
    return hashlib.blake2b(f"{args!r} {dtype} {gguf_bits} {files}".encode(), digest_size=16).hexdigest()


def check_directory(directory: str) -> Path:
    """The prompt cache directory, made if need be; MistralError if it cannot be one."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise MistralError(f"prompt cache directory '{directory}': expected a directory, found a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MistralError(f"prompt cache directory '{directory}': cannot make it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise MistralError(f"prompt cache directory '{directory}': expected a writable directory")
    return path


def _named(block: Block) -> list[tuple[str, mx.array]]:
    return [(f"{g}.{a}", x) for g, arrays in enumerate(block) for a, x in enumerate(arrays)]


def _numpy(block: Block) -> dict[str, np.ndarray]:
    return {name: np.array(x.view(mx.uint16) if x.dtype in HALF else x) for name, x in _named(block)}


class DiskCache:
    """Block files under `directory`, at most `max_bytes` in all. `metadata` is what every file
    must carry (and its key); `template` a block of the right shapes and dtypes."""

    def __init__(self, directory: str, max_bytes: int, metadata: dict[str, str], template: Block):
        self.path, self.max_bytes, self.metadata = check_directory(directory), max_bytes, metadata
        self._groups = [len(arrays) for arrays in template]
        self._dtypes = {name: x.dtype for name, x in _named(template)}
        self._expected = {name: (a.shape, a.dtype) for name, a in _numpy(template).items()}
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._queued: set[str] = set()
        self.nbytes = self._pending = 0
        self._warned = False
        self._scan()
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._write_all, name="prompt-cache-writer", daemon=True).start()

    def __len__(self) -> int:
        return len(self._files)

    def has(self, key: str) -> bool:
        return key in self._files

    def put(self, key: str, block: Block) -> None:
        """Hand `block` to the writer (model thread: its numpy copy is made here)."""
        size = sum(x.nbytes for _, x in _named(block))
        with self._lock:
            if key in self._files or key in self._queued or self._pending + size > MAX_PENDING_BYTES:
                return
            self._pending += size
            self._queued.add(key)
        self._queue.put((key, _numpy(block), size))

    def read(self, key: str) -> Block | None:
        """The block of `key` (model thread), or None: gone meanwhile, or a bad file (one warning,
        and the file is deleted)."""
        file = self._file(key)
        try:
            with safe_open(str(file), framework="numpy") as f:
                metadata, arrays = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
            if metadata != dict(self.metadata, key=key):
                raise ValueError("written for another model, cache setting or key")
            if {name: (a.shape, a.dtype) for name, a in arrays.items()} != self._expected:
                raise ValueError("not the tensors this model's blocks have")
        except FileNotFoundError:  # evicted (or deleted) meanwhile
            self._drop(key)
            return None
        except Exception as e:  # noqa: BLE001  (any unreadable file: the prompt is prefilled instead)
            warnings.warn(f"prompt cache: skipped and deleted {file} ({e})", stacklevel=2)
            self._drop(key)
            return None
        try:
            os.utime(file)
        except OSError:
            pass
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
        return [[self._array(arrays[f"{g}.{a}"], self._dtypes[f"{g}.{a}"]) for a in range(n)]
                for g, n in enumerate(self._groups)]

    def flush(self) -> None:
        """Wait until every block handed to put() is written (or dropped)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is pending, then end the writer thread."""
        self._queue.put(None)
        self._queue.join()

    @staticmethod
    def _array(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
        x = mx.array(a)
        return x.view(dtype) if dtype in HALF else x

    def _file(self, key: str) -> Path:
        return self.path / f"{key}{SUFFIX}"

    def _scan(self) -> None:
        """The files a run before this one left, oldest first; a temporary file is a write
        that never finished."""
        found = []
        for p in self.path.iterdir():
            if p.suffix == ".tmp":
                p.unlink(missing_ok=True)
            elif p.suffix == SUFFIX and p.is_file():
                stat = p.stat()
                found.append((stat.st_mtime, p.stem, stat.st_size))
        for _, key, size in sorted(found):
            self._files[key] = size
            self.nbytes += size
        with self._lock:
            self._make_room(0)

    def _make_room(self, size: int) -> None:
        """Delete the least recently used files until `size` more bytes fit (lock held)."""
        while self._files and self.nbytes + size > self.max_bytes:
            key, old = self._files.popitem(last=False)
            self.nbytes -= old
            self._file(key).unlink(missing_ok=True)

    def _drop(self, key: str) -> None:
        with self._lock:
            self.nbytes -= self._files.pop(key, 0)
        self._file(key).unlink(missing_ok=True)

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, key: str, arrays: dict[str, np.ndarray], size: int) -> None:
        """(the writer thread) One block's file: temporary name, then its own."""
        data = save(arrays, dict(self.metadata, key=key))
        file = self._file(key)
        tmp = file.with_suffix(".tmp")
        with self._lock:
            self._pending -= size
            self._queued.discard(key)
            if len(data) > self.max_bytes:
                return
            self._make_room(len(data))
            self.nbytes += len(data)  # from now on: the temporary file counts
        try:
            tmp.write_bytes(data)
            os.replace(tmp, file)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.nbytes -= len(data)
            if not self._warned:
                self._warned = True
                warnings.warn(f"prompt cache: could not write {file} ({e.strerror or e}); blocks stay in memory")
            return
        with self._lock:
            self._files[key] = len(data)
