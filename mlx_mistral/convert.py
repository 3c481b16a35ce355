"""A checkpoint -> an MLX directory: cast, mlx-lm's quantization format, streamed safetensors shards.

convert() reads with the loader's read_checkpoint() (names, q/k permutation) and checks tensors
with its check_weights(), so what it writes is what load() and mlx_lm.load() read. Nothing is
evaluated before write_safetensors(), which evaluates, writes and drops one tensor at a time:
peak memory is about the largest tensor, not the model.
"""

import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from tqdm import tqdm

from .config import ModelArgs, Quantization
from .errors import MistralError
from .loading import check_weights, read_checkpoint, resolve
from .loading.vision import PREFIXES as VISION_PREFIXES
from .model import Mistral
from .moe import is_router
from .template_tokenizer import byte_level_json
from .tokenizer import Tokenizer

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
SHARD_BYTES = 5 * 10**9  # Hugging Face's limit per weight file
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


@dataclass(frozen=True)
class Summary:
    parameters: int  # weights before quantization
    tensor_bytes: int  # weights, scales and biases as stored
    disk_bytes: int  # every file written
    shards: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.parameters

    def __str__(self) -> str:
        return (
            f"{self.parameters / 1e6:.1f}M parameters, {self.disk_bytes / 2**20:.1f} MiB on disk "
            f"in {self.shards} shard(s), {self.bits_per_weight:.2f} bits per weight (scales included), "
            f"{self.seconds:.1f} s"
        )


def convert(src: str, dst: str | Path, dtype: str | None = None, quantization: Quantization | None = None,
            force: bool = False, shard_bytes: int = SHARD_BYTES, progress: bool = False) -> Summary:
    """Convert SRC (directory or Hub repo id, either layout) into the MLX directory DST.

    dtype: output float dtype (default: SRC's). DST is written beside itself and renamed into
    place when complete: a failed or interrupted run leaves no DST (and an old DST as it was).
    """
    start = time.perf_counter()
    dst = Path(dst).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise MistralError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization and (quantization.bits not in BITS or quantization.group_size not in GROUP_SIZES):
        raise MistralError(
            f"quantization: bits must be 4 or 8 and group size 32, 64 or 128, got {quantization.bits} "
            f"bits, group size {quantization.group_size}"
        )
    check_destination(dst, force)
    src_dir = resolve(src)
    if dst.resolve() in (src_dir.resolve(), *src_dir.resolve().parents):
        raise MistralError(f"output directory {dst} is or contains the source directory")
    args, weights, tokenizer = read_checkpoint(src_dir)
    if args.vision:  # not written yet (issue 33): the output is the text model, as mlx-lm's is
        warnings.warn(f"{src_dir}: the vision tower and projector are not converted; the output is the "
                      "text model", stacklevel=2)
        weights = {k: w for k, w in weights.items() if not k.startswith(VISION_PREFIXES)}
        args = replace(args, vision=None)
    if args.quantization:
        raise MistralError(f"{src_dir}: already quantized; convert from an unquantized checkpoint")
    check_weights(Mistral(args), weights)  # Mistral(args) is lazy: its random init is never evaluated
    parameters = sum(w.size for w in weights.values())
    out_dtype = getattr(mx, dtype) if dtype else next(iter(weights.values())).dtype
    tensors = {name: w.astype(out_dtype) for name, w in weights.items()}
    del weights  # from here on only the lazy outputs refer to SRC tensors, and each goes once written
    if quantization:
        tensors = quantize_weights(args, tensors, quantization)
        args = replace(args, quantization=quantization)
    tensor_bytes = sum(w.nbytes for w in tensors.values())
    # tokenizer.model for transformers and mlx-lm; a versioned one (.v7) also as is, for its version
    files = {"tokenizer.model" if tokenizer.name.startswith("tokenizer.model") else tokenizer.name: tokenizer,
             tokenizer.name: tokenizer}
    files.update({name: src_dir / name for name in TOKENIZER_JSON if (src_dir / name).exists()})
    try:
        with staging(dst) as tmp:
            shards = save_checkpoint(tmp, args, tensors, files, shard_bytes, progress)
            config = None if "tokenizer_config.json" in files else hf_tokenizer_config(tokenizer)
            if config:
                (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise MistralError(f"output directory {dst}: could not be written ({e})") from None
    disk_bytes = sum(f.stat().st_size for f in dst.iterdir())
    return Summary(parameters, tensor_bytes, disk_bytes, shards, time.perf_counter() - start)


def hf_tokenizer_config(tokenizer_file: Path) -> dict | None:
    """tokenizer_config.json for transformers and mlx-lm, so that they add BOS and apply Mistral's
    chat template (Jinja, from mistral-common) for the tokenizer's version. None for Tekken, whose
    tekken.json they do not read this way, and for a byte-level tokenizer.json that is not Mistral's
    (its chat template is the directory's own)."""
    if tokenizer_file.name == "tokenizer.json" and byte_level_json(tokenizer_file):
        return None
    tokenizer = Tokenizer(tokenizer_file)
    if tokenizer.tekken:
        return None
    template = generate_chat_template(
        spm=True, tokenizer_version=TokenizerVersion(tokenizer.version), image_support=False,
        audio_support=False, thinking_support=False, default_system_prompt=None, plain_thinking_support=False,
        use_special_token_variables=True, model_settings_fields=None, reasoning_effort_values=None,
        reasoning_effort_default=None,
    )
    # legacy: False = no extra "\u2581" after a special token (transformers 5 converts tokenizer.model so)
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": template}


def quantize_weights(args: ModelArgs, weights: dict[str, mx.array], q: Quantization) -> dict[str, mx.array]:
    """mlx-lm's format (lazy): each layer nn.quantize replaces (every Linear and Embedding, and
    Mixtral's stacked experts; norms and Mixtral's routers stay as they are) holds `weight`
    (uint32), `scales` and `biases` from mx.quantize."""
    layers = {path for path, m in Mistral(args).named_modules() if hasattr(m, "to_quantized") and not is_router(path)}
    out = {}
    for name, w in weights.items():
        layer = name.removesuffix(".weight")
        if layer not in layers:
            out[name] = w
            continue
        if w.shape[-1] % q.group_size:
            raise MistralError(
                f"quantization: group size {q.group_size} does not divide the input dimension "
                f"{w.shape[-1]} of {layer}"
            )
        out[name], out[f"{layer}.scales"], out[f"{layer}.biases"] = mx.quantize(w, q.group_size, q.bits)
    return out


def check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise MistralError(f"output directory {dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise MistralError(f"output directory {dst}: exists and is not empty (use --force to replace it)")


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """A fresh directory beside `dst`, renamed to `dst` when the block completes.

    On any exception (Ctrl-C included) it is removed and an existing `dst` is left untouched.
    Its name holds this process's id: one left by a killed run is removed by the next run here.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_killed_runs(dst.parent)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():  # --force: swap, then delete the old one
            old = tmp.with_suffix(".old")
            dst.rename(old)
            try:
                tmp.rename(dst)
            except BaseException:
                old.rename(dst)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_killed_runs(parent: Path) -> None:
    """Remove the staging directories in `parent` whose run's process is gone (killed: SIGKILL,
    power loss), saying so; those of live runs are theirs."""
    for path in parent.glob(".*.partial"):
        match = re.fullmatch(r"\..+\.(\d+)-[0-9a-f]{8}\.partial", path.name)
        if match and path.is_dir() and not process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            warnings.warn(f"removed {path}: left by a convert run that was killed", stacklevel=2)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def save_checkpoint(out_dir: Path, args: ModelArgs, tensors: dict[str, mx.array],
                    tokenizer_files: dict[str, Path], shard_bytes: int = SHARD_BYTES,
                    progress: bool = False) -> int:
    """Write config.json, `tensors` as safetensors shards of at most `shard_bytes` (a larger tensor
    gets a shard of its own) with model.safetensors.index.json, and the tokenizer files (DST name
    -> SRC path). `tensors` is emptied as they are written. Returns the number of shards."""
    dtype = next(w.dtype for w in tensors.values() if mx.issubdtype(w.dtype, mx.floating))
    config = {**args.to_hf(), "torch_dtype": str(dtype).removeprefix("mlx.core.")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[list[str]] = []
    size = 0
    for name, w in tensors.items():
        if not shards or size + w.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += w.nbytes
    n = len(shards)
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    files = files if n > 1 else ["model.safetensors"]
    index = {
        "metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
        "weight_map": {name: file for file, shard in zip(files, shards) for name in sorted(shard)},
    }
    with tqdm(total=len(tensors), unit="tensor", desc="converting", disable=not progress) as bar:
        for file, shard in zip(files, shards):
            write_safetensors(out_dir / file, {name: tensors.pop(name) for name in shard}, bar.update)
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, path in tokenizer_files.items():
        shutil.copyfile(path, out_dir / name)
    return n


def write_safetensors(path: Path, tensors: dict[str, mx.array],
                      on_tensor: Callable[[], object] = lambda: None) -> None:
    """mx.save_safetensors' format (metadata {"format": "mlx"}), streamed: the header comes from the
    lazy shapes, then each tensor is evaluated, written and dropped (popped from `tensors`).
    mx.save_safetensors would evaluate the whole dict first, holding a 5 GB shard (and its sources)."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, w in tensors.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}
        offset += w.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in list(tensors):
            w = mx.contiguous(tensors.pop(name))
            try:
                mx.eval(w)
            except (RuntimeError, ValueError) as e:
                raise MistralError(f"tensor '{name}' could not be read from the checkpoint ({e})") from None
            f.write(memoryview(w))
            del w
            on_tensor()
