"""Quality on a real model: SmolLM2-135M-Instruct, perplexity, KL divergence and top-1 agreement.

The text is Python's own documentation (pydoc_data/topics.py, on every machine), tokenized by our
tokenizer of the GGUF file and cut into windows of --ctx tokens. As llama.cpp's
`llama-perplexity --kl-divergence` does, each window is fed from its start and only the
predictions of its second half are scored (the first half is context): perplexity is
exp(mean negative log-likelihood of the actual next token); KL is the mean over scored tokens of
sum_v p_ref(v) log(p_ref(v) / p(v)); top-1 is the share of tokens whose most likely next token
equals the reference's.

The reference is transformers' float32 model of the same GGUF file (it dequantizes the Q4_1
weights): the only weights SmolLM2 has are already 4-bit, group 32. So rows that requantize onto
that grid (Q4_1 as stored, affine 4-bit group 32) are ~0 by construction; group 64 and 3-/2-bit
weights, and the KV-cache rows, are the informative ones. Weight quantizations are scored on
their dequantized float32 weights (the same function; CPU quantized matmuls are slower), except
"Q4_1 as stored", which runs the quantized layers. Every row feeds each window in prefill chunks of
--chunk tokens (a quantized cache quantizes what it stores, the current chunk included).
mlx-lm (its llama model, `quantize_model` as its `convert -q`, its QuantizedKVCache) runs beside us.

    python benchmarks/bench_quality.py [--windows 10] [--ctx 2048] [--chunk 512] [--json] [--plot FILE]
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_mistral import make_cache
from mlx_mistral.gguf_tokenizer import gguf_tokenizer
from mlx_mistral.loading import build_model, dequantized, read_gguf, resolve

KV_GROUP = 64


def text_ids(tokenizer, n: int) -> list[int]:
    text = Path(importlib.util.find_spec("pydoc_data.topics").origin).read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    if len(ids) < n:
        sys.exit(f"pydoc_data/topics.py has {len(ids)} tokens, fewer than the {n} asked for")
    return ids[:n]


def quantized_weights(weights: dict, bits: int, group: int) -> dict:
    """Float weights through affine quantization (every Linear and the embedding, as convert does)
    and back: the function a quantized checkpoint computes."""
    out = {}
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[-1] % group == 0:
            w = mx.dequantize(*mx.quantize(w, group, bits), group, bits)
        out[name] = w
    return out


def ours(model, kv_bits):
    def run(window: list[int], chunk: int) -> mx.array:
        cache = make_cache(model.args, len(window), kv_bits=kv_bits, kv_group_size=KV_GROUP, warn_on_roll=False)
        return mx.concatenate([model(mx.array([window[s:s + chunk]]), cache)[0]
                               for s in range(0, len(window), chunk)]).astype(mx.float32)
    return run


def mlx_lm_model(args, weights: dict, bits: int | None = None, group: int = 64):
    from mlx_lm.models import llama
    from mlx_lm.utils import dequantize_model, quantize_model

    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=args.dim, num_hidden_layers=args.n_layers, intermediate_size=args.hidden_dim,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps, vocab_size=args.vocab_size, rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_word_embeddings, max_position_embeddings=args.max_position_embeddings))
    model.load_weights(list(weights.items()), strict=True)
    if bits:
        model = dequantize_model(quantize_model(model, {}, group, bits)[0])
    mx.eval(model.parameters())
    return model


def theirs(model, kv_bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    def run(window: list[int], chunk: int) -> mx.array:
        n = len(model.layers)
        cache = [QuantizedKVCache(group_size=KV_GROUP, bits=kv_bits) if kv_bits else KVCache() for _ in range(n)]
        return mx.concatenate([model(mx.array([window[s:s + chunk]]), cache=cache)[0]
                               for s in range(0, len(window), chunk)]).astype(mx.float32)
    return run


def transformers_reference(path: Path):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)

    def run(window: list[int], chunk: int) -> mx.array:
        with torch.no_grad():
            return mx.array(hf(torch.tensor([window])).logits[0].numpy())
    return run


def rows(path: Path) -> dict:
    """Each row's (description, run(window, chunk) -> logits [L, V])."""
    args, stored, _ = read_gguf(path)
    fargs, floats = dequantized(args, dict(stored))
    mx.eval(floats)
    model = build_model(fargs, dict(floats), mx.float32)
    q41 = build_model(args, stored, mx.float32)
    out = {
        "transformers float32 (reference)": transformers_reference(path),
        "ours float32": ours(model, None),
        "ours GGUF Q4_1 as stored": ours(q41, None),
        "mlx-lm float32": theirs(mlx_lm_model(fargs, floats), None),
    }
    for bits, group in ((8, 64), (4, 64), (4, 32), (3, 64), (2, 64)):
        out[f"ours {bits}-bit g{group} weights"] = ours(build_model(fargs, quantized_weights(floats, bits, group),
                                                                     mx.float32), None)
        out[f"mlx-lm {bits}-bit g{group} weights"] = theirs(mlx_lm_model(fargs, floats, bits, group), None)
    for bits in (8, 4):
        out[f"ours KV {bits}-bit (float32 weights)"] = ours(model, bits)
        out[f"ours KV {bits}-bit (Q4_1 as stored)"] = ours(q41, bits)
        out[f"mlx-lm KV {bits}-bit (float32 weights)"] = theirs(mlx_lm_model(fargs, floats), bits)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--only", help="comma-separated row names to run (besides the reference)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a bar chart of KL divergence per row to this PNG")
    a = p.parse_args()
    path = resolve("smollm2")
    tokenizer = gguf_tokenizer(path, read_gguf(path)[2])
    ids = text_ids(tokenizer, a.windows * a.ctx)
    runs = rows(path)
    if a.only:
        keep = {"transformers float32 (reference)", *a.only.split(",")}
        runs = {k: v for k, v in runs.items() if k in keep}
    first = a.ctx // 2
    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "seconds": 0.0} for name in runs}
    scored = 0
    for w in range(a.windows):
        window = ids[w * a.ctx:(w + 1) * a.ctx]
        targets = mx.array(window[first + 1:])
        ref = None
        for name, run in runs.items():
            t0 = time.perf_counter()
            logits = run(window, a.chunk)[first:-1]
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(logp)
            sums[name]["seconds"] += time.perf_counter() - t0
            ref = logp if ref is None else ref
            s = sums[name]
            s["nll"] -= mx.take_along_axis(logp, targets[:, None], axis=-1).sum().item()
            s["kl"] += mx.sum(mx.exp(ref) * (ref - logp)).item()
            s["top1"] += mx.sum(mx.argmax(ref, axis=-1) == mx.argmax(logp, axis=-1)).item()
        scored += len(window) - first - 1
        print(f"window {w + 1}/{a.windows} done", file=sys.stderr, flush=True)
    results = {name: {"ppl": float(np.exp(s["nll"] / scored)), "mean_kl": s["kl"] / scored,
                      "top1": s["top1"] / scored, "seconds": s["seconds"]} for name, s in sums.items()}
    if a.json:
        print(json.dumps({"tokens": len(ids), "scored": scored, "ctx": a.ctx, "chunk": a.chunk, "results": results}))
    else:
        print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of pydoc_data/topics.py in windows of {a.ctx} "
              f"({scored} scored), chunks of {a.chunk}")
        print(f"| row | perplexity | mean KL vs reference | top-1 agreement |\n|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['ppl']:.4f} | {r['mean_kl']:.2e} | {r['top1']:.4f} |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n in results if "reference" not in n]
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1))
        ax.barh(names, [max(results[n]["mean_kl"], 1e-7) for n in names], color=[
            "#d9534f" if n.startswith("mlx-lm") else "#337ab7" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("mean KL divergence from transformers float32 (log scale)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
