"""python -m convert on a benchmark preset to fp16, 8-bit and 4-bit: time, peak RAM, size, quality.

The preset (presets.py; `small` by default, `--preset 7b --layers 2` has Mistral 7B's tensor
shapes) is written with random bfloat16 weights in Hugging Face layout, like a Hub checkpoint.
Each conversion runs in a process of its own, so its peak RSS is its own. Quality is the mean
KL divergence and top-1 agreement of next-token distributions against the source in float32,
with quantized weights dequantized to float32 first (the same function: CPU quantized matmuls
are ~50x slower than dense ones). Full Mistral 7B sizes are computed, not run.

    python benchmarks/bench_convert.py [--preset small] [--layers N] [--positions 256] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_mistral import Mistral, ModelArgs, make_cache  # noqa: E402
from mlx_mistral.loading import build_model, dequantized, read_checkpoint  # noqa: E402
from presets import PRESETS, preset_args, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROUP_SIZE = 64
FORMATS = {  # `python -m convert` flags, each with --dtype float16
    "fp16": [],
    "8-bit": ["--quantize", "--bits", "8", "--group-size", str(GROUP_SIZE)],
    "4-bit": ["--quantize", "--bits", "4", "--group-size", str(GROUP_SIZE)],
}
# Linux counts the RSS a forked child shares with its parent in the child's ru_maxrss, so the
# measured process is started by this small launcher, not by the (large) benchmark process.
LAUNCHER = ("import os, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); "
            "print(os.waitstatus_to_exitcode(status), time.perf_counter() - t, usage.ru_maxrss * 1024)")


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd` in a process of its own (Linux)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=REPO, env=env,
                         capture_output=True, text=True)
    status, seconds, peak = out.stdout.split() if out.returncode == 0 else ("1", "0", "0")
    if status != "0":
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return float(seconds), int(peak)


def dense_fp32(path: Path) -> Mistral:
    """The checkpoint's function with dense float32 weights (quantized layers dequantized)."""
    args, weights, _ = read_checkpoint(path)
    return build_model(*dequantized(args, weights), mx.float32)


def next_token_logprobs(model: Mistral, ids: list[int]) -> np.ndarray:
    logits = model(mx.array([ids]), make_cache(model.args, len(ids)))[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)


def parameter_count(args: ModelArgs) -> int:
    return sum(p.size for _, p in tree_flatten(Mistral(args).parameters()))  # lazy: nothing allocated


def stored_bytes(args: ModelArgs, bits: int | None) -> int:
    """Tensor bytes at fp16, or quantized with fp16 scales and biases (norms stay fp16)."""
    return sum(int(p.size * (bits + 32 / GROUP_SIZE if bits and "norm" not in name else 16) / 8)
               for name, p in tree_flatten(Mistral(args).parameters()))


def bench(args: ModelArgs, positions: int, tmp: Path) -> dict:
    src = write_checkpoint(args, tmp / "hf", mx.bfloat16)
    parameters = parameter_count(args)
    ids = np.random.default_rng(0).integers(3, args.vocab_size, positions).tolist()
    reference = next_token_logprobs(dense_fp32(src), ids)
    _, baseline = run_measured([sys.executable, "-c", "import mlx_mistral.convert"])
    rows = {}
    for fmt, flags in FORMATS.items():
        dst = tmp / fmt
        seconds, peak = run_measured([sys.executable, "-m", "convert", "--model", str(src), "--out", str(dst),
                                      "--dtype", "float16", *flags])
        stored = json.loads((dst / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        logprobs = next_token_logprobs(dense_fp32(dst), ids)
        rows[fmt] = {
            "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak / 2**20, 1),
            "disk_mib": round(sum(f.stat().st_size for f in dst.iterdir()) / 2**20, 1),
            "bits_per_weight": round(8 * stored / parameters, 3),
            "kl_vs_fp32": max(0.0, float((np.exp(reference) * (reference - logprobs)).sum(-1).mean())),
            "top1_vs_fp32": float((reference.argmax(-1) == logprobs.argmax(-1)).mean()),
        }
    return {
        "parameters": parameters,
        "source_bf16_mib": round(sum(f.stat().st_size for f in src.iterdir()) / 2**20, 1),
        "fp32_mean_top_probability": float(np.exp(reference.max(-1)).mean()),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "formats": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--positions", type=int, default=256, help="token positions for KL and top-1")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args()
    args = preset_args(opts.preset)
    args = replace(args, n_layers=opts.layers or args.n_layers)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"preset": opts.preset, "layers": args.n_layers, "positions": opts.positions,
                  **bench(args, opts.positions, Path(tmp))}
    m7 = preset_args("7b")
    result["mistral_7b_computed"] = {
        "parameters": parameter_count(m7),
        **{f"{name}_gb": round(stored_bytes(m7, bits) / 1e9, 2)
           for name, bits in (("fp16", None), ("8bit", 8), ("4bit", 4))},
    }
    if opts.json:
        print(json.dumps(result))
        return
    print(f"preset {opts.preset}, {args.n_layers} layers: {result['parameters'] / 1e6:.1f}M parameters, "
          f"source bf16 {result['source_bf16_mib']} MiB; KL and top-1 over {opts.positions} positions "
          f"vs fp32 "
          f"(fp32 mean top probability {result['fp32_mean_top_probability']:.4f})")
    print(f"{'format':<7}{'time s':>8}{'peak RSS MiB':>14}{'disk MiB':>10}{'bits/weight':>13}"
          f"{'KL vs fp32':>12}{'top-1':>8}")
    for fmt, r in result["formats"].items():
        print(f"{fmt:<7}{r['seconds']:>8.2f}{r['peak_rss_mib']:>14.1f}{r['disk_mib']:>10.1f}"
              f"{r['bits_per_weight']:>13.3f}{r['kl_vs_fp32']:>12.2e}{r['top1_vs_fp32']:>8.3f}")
    print(f"baseline RSS (python, imports, no conversion): {result['baseline_rss_mib']} MiB")
    m = result["mistral_7b_computed"]
    print(f"Mistral 7B (computed): {m['parameters'] / 1e9:.3f}B parameters; fp16 {m['fp16_gb']} GB, "
          f"8-bit {m['8bit_gb']} GB, 4-bit {m['4bit_gb']} GB (group {GROUP_SIZE}, fp16 scales and biases)")


if __name__ == "__main__":
    main()
