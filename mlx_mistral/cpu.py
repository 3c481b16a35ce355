"""The CPU backend's faster paths, swapped into a loaded model by `prepare_for_cpu`.

Used only when MLX's default device is the CPU (as on Linux); on a Mac (Metal) none of
this runs. Each path keeps the model's maths; the measured reasons are in the docstrings.
MLX_MISTRAL_CPU_PATHS=0 turns them off, so that Linux runs the code path a Mac runs.
"""

import functools
import math
import os
import statistics
import threading
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import MistralError
from .model import Attention
from .moe import SwitchGLU, SwitchLinear
from .rope import RoPE


def cpu_paths_on() -> bool:
    """True on the CPU backend unless the environment sets MLX_MISTRAL_CPU_PATHS=0."""
    value = os.environ.get("MLX_MISTRAL_CPU_PATHS", "1")
    if value not in ("0", "1"):
        raise MistralError(f"MLX_MISTRAL_CPU_PATHS must be 0 or 1, got {value!r}")
    return value == "1" and mx.default_device() == mx.cpu


class TransposedLinear(nn.Module):
    """A bias-free Linear whose weight is stored as [in, out] (`x @ weight_t`).

    Whether this layout pays depends on the CPU: OpenBLAS 0.3.21 multiplied one token by an
    [in, out] matrix 1.3-2.3x faster than by the checkpoint's [out, in] on an AMD EPYC, at
    the same speed for prompt chunks; on an Intel Xeon it made decode 1.6x and prefill 6x
    slower (the `small` preset). So prepare_for_cpu measures it first (transposed_pays).
    """

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight_t = mx.contiguous(weight.T)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if 2 < rows < 16:  # OpenBLAS multiplies 16 rows faster than 3 to 15 (measured): pad
            x2 = mx.concatenate([x.reshape(rows, -1), mx.zeros((16 - rows, x.shape[-1]), x.dtype)])
            return (x2 @ self.weight_t)[:rows].reshape(*x.shape[:-1], -1)
        return x @ self.weight_t


_threads = threading.local()


def cpu_streams(n: int) -> list[mx.Stream]:
    """n CPU streams of the calling thread (MLX streams belong to the thread that made them)."""
    if len(getattr(_threads, "streams", ())) != n:
        _threads.streams = [mx.new_stream(mx.cpu) for _ in range(n)]
    return _threads.streams


class ParallelQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose output rows are split over one CPU stream per core, and whose
    prompt chunks are multiplied by the dequantized matrix.

    MLX's CPU quantized matmul runs on one core, but ops on separate streams run at once.
    Each output is still computed by the same kernel from the same row of weights, so the
    result is bit for bit that of nn.QuantizedLinear (measured: 4-bit decode 1.6x on 2
    cores). The weights stay whole: a slice of leading rows is a view, not a copy.

    That kernel is a plain loop, ~1 ms per row of x for a 576 x 1536 4-bit matrix: 500 ms
    for a 512-token chunk, where dequantizing the matrix (the same values) and calling BLAS
    takes 14 ms (measured on 2 cores). So from DEQUANTIZE_FROM rows of x on, the layer
    computes x @ dequantize(w).T, one layer's matrix in float at a time.

    Only products that call no BLAS are split (this one, and the attention on a quantized
    cache: Attention.head_streams). Splitting the float attention (which calls BLAS) or
    SwiGLU too made some processes hang at exit in OpenBLAS 0.3.21's shutdown (~1 in 25).
    """

    DEQUANTIZE_FROM = 16  # rows of x; OpenBLAS is slow below 16 (TransposedLinear)

    def __init__(self, q: nn.QuantizedLinear, parts: int):
        nn.Module.__init__(self)  # not QuantizedLinear's, which would quantize a new matrix
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        self.group_size, self.bits, self.mode, self.parts = q.group_size, q.bits, q.mode, parts

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] >= self.DEQUANTIZE_FROM:
            w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
            return x @ w.T
        n = self.weight.shape[0]
        step = -(-n // self.parts)
        outs = []
        for start, stream in zip(range(0, n, step), cpu_streams(self.parts)):
            rows = slice(start, start + step)
            outs.append(mx.quantized_matmul(x, self.weight[rows], self.scales[rows], self.biases[rows],
                                            transpose=True, group_size=self.group_size, bits=self.bits,
                                            stream=stream))
        return mx.concatenate(outs, axis=-1)


class StepTables:
    """The RoPE tables of the step being built, shared by the layers of one model: for each
    shape rotated (queries, keys), cos and sin laid out as TabledRoPE multiplies them."""

    def __init__(self):
        self.key: tuple | None = None
        self.tables: dict[tuple[int, ...], tuple[mx.array, mx.array]] = {}


class TabledRoPE(nn.Module):
    """mx.fast.rope's CPU fallback, its tables computed once per step instead of at every call.

    On the CPU backend mx.fast.rope has no kernel: its fallback graph computes the angles, cos and
    sin at every call, then x1 cos - x2 sin, x1 sin + x2 cos (28 ops; q and k in 30 layers: 1680 of a
    SmolLM2-shaped token's ~3740 ops, and every op costs ~3.5 us here). The layers share the step's
    tables (`step`): the angles as the fallback computes them (float32; cos and sin in x's dtype),
    laid out as [cos, cos] and [-sin, sin] over x's shape, so that a call is 6 ops:
    x [cos, cos] + [x2, x1] [-sin, sin]. Bit for bit the fallback (tested): x2 (-sin) = -(x2 sin).
    """

    def __init__(self, rope: RoPE, step: StepTables):
        super().__init__()
        self.half, self.step = rope.head_dim // 2, step
        periods = rope._periods
        if periods is None:  # the fallback's base ** (-i / half), as it computes it
            exponents = mx.arange(0, -self.half, -1, dtype=mx.float32)
            self._inv = mx.exp(exponents * (math.log(rope.theta) / self.half))
        else:
            self._inv = mx.reciprocal(periods)
        self._config = (rope.head_dim, rope.theta, None if periods is None else tuple(periods.tolist()))

    def tables(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        length = x.shape[2]
        key = (self._config, offset if isinstance(offset, int) else tuple(offset.tolist()), length, x.dtype)
        if self.step.key != key:
            self.step.key, self.step.tables = key, {}
        if x.shape not in self.step.tables:
            at = offset if isinstance(offset, int) else offset[:, None, None]  # [B, 1, 1]: one per row
            theta = (mx.arange(length, dtype=mx.float32) + at)[..., None] * self._inv
            cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
            self.step.tables[x.shape] = tuple(mx.broadcast_to(t, x.shape) for t in (
                mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)))
        return self.step.tables[x.shape]

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        cos, sin = self.tables(x, offset)
        return x * cos + mx.concatenate([x[..., self.half:], x[..., :self.half]], axis=-1) * sin


STREAMED_BYTES = 64 << 20  # matrices timed at once by transposed_pays: past any CPU's last-level cache


def transposed_pays(weights: list[mx.array], reps: int = 5) -> bool:
    """True when this machine multiplies by `weights` (the first layers' matrices) stored [in, out]
    clearly faster than as they are, [out, in]: one token (decode) 10% faster, and a 64-token chunk
    no slower. Each timing is one pass over all of `weights`: decode streams every matrix from
    memory once per token, so the pass must outgrow the caches (STREAMED_BYTES; one matrix timed
    alone stays in cache, and there [in, out] won 1.3x on this AMD EPYC for the SmolLM2 shape,
    while streamed it lost 1.2x and made decode 0.66x mlx-lm). The two layouts are timed in
    alternation and compared by the median of `reps` ratios: with the best time of each, taken
    at different moments, two loads in twelve chose [in, out] on that shape (decode 58 ms a token,
    not 51)."""
    transposed = [mx.contiguous(w.T) for w in weights]
    mx.eval(transposed)

    def seconds(products: list[mx.array]) -> float:
        start = time.perf_counter()
        mx.eval(products)
        return time.perf_counter() - start

    ratio = {}
    for rows in (1, 64):
        xs = {w.shape[1]: mx.ones((rows, w.shape[1]), w.dtype) for w in weights}
        ratios = []
        for _ in range(reps + 1):  # the first pair warms up
            plain = seconds([xs[w.shape[1]] @ w.T for w in weights])
            ratios.append(seconds([xs[w.shape[0]] @ w for w in transposed]) / plain)
        ratio[rows] = statistics.median(ratios[1:])
    return ratio[1] < 0.9 and ratio[64] <= 1.1


def first_layers(model: nn.Module) -> list[mx.array]:
    """The float matrices of the first layers, as many layers as make STREAMED_BYTES, or an eighth
    of the model's (their transposed copies exist while they are timed), at least one layer."""
    layers = [[m.weight for _, m in layer.named_modules() if type(m) is nn.Linear and "bias" not in m]
              for layer in model.model.layers]
    enough = min(STREAMED_BYTES, sum(w.nbytes for ws in layers for w in ws) / 8)
    weights: list[mx.array] = []
    for matrices in layers:
        weights += matrices
        if sum(w.nbytes for w in weights) >= enough:
            break
    return weights


def prepare_for_cpu(model: nn.Module) -> None:
    """Switch `model` to the CPU backend's faster paths, in place: float nn.Linear (no bias)
    -> TransposedLinear where this CPU measures it faster (transposed_pays, on the first
    layers' matrices), affine nn.QuantizedLinear -> ParallelQuantizedLinear (one CPU stream per
    core, prompt chunks through BLAS), folded decode attention (model.Attention.fold_gqa), RoPE
    tables shared by the layers (TabledRoPE), the K/V heads of a quantized cache attended to on
    one CPU stream per core (head_streams), and float Mixtral experts run all at once on prefill
    chunks (moe.SwitchGLU.every_expert_for_chunks; the stacked experts are otherwise left as they
    are: they are gathers, not Linears)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parts = min(cores, 8)
    first = first_layers(model)
    transpose = bool(first) and transposed_pays(first)
    step = StepTables()
    modules = model.named_modules()
    while modules:  # popped and swapped one at a time: a replaced matrix is freed at once
        path, module = modules.pop()
        if type(module) is nn.Linear and "bias" not in module and transpose:
            swap = TransposedLinear(module.weight)
            mx.eval(swap.weight_t)
        elif type(module) is nn.QuantizedLinear and "bias" not in module and module.mode == "affine":
            swap = ParallelQuantizedLinear(module, parts)
        else:
            if isinstance(module, Attention):
                module.fold_gqa = True
                module.rope = TabledRoPE(module.rope, step)
                if parts > 1:
                    module.head_streams = functools.partial(cpu_streams, parts)
            if isinstance(module, SwitchGLU) and type(module.gate_proj) is SwitchLinear:
                module.every_expert_for_chunks = True
            continue
        model.update_modules(tree_unflatten([(path, swap)]))
        del module, swap
