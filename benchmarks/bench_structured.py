"""Structured output: what a grammar's mask costs per token, what constrained rows cost the
scheduler, and how long a grammar takes to build.

    python benchmarks/bench_structured.py [--preset small] [--clients 8] [--prompt-tokens 128]
                                          [--answer-tokens 64] [--reps 3] [--walks 20] [--json]

1. Mask per token, per tokenizer (V3 SentencePiece, Tekken): seeded random walks through a nested
   schema (each step a token drawn among the allowed ones); the time llguidance takes to fill one
   row's bitmask (median, p99), and the time of the whole mask of one row on MLX logits
   (structured.masked: fill, unpack, where, evaluated).
2. Through the scheduler (no HTTP): --clients greedy requests at once on the preset (random
   weights, its V1 tokenizer: vocabulary 32000), all free, all constrained, half and half;
   aggregate tok/s = generated tokens / wall time from the first submit to the last token, and the
   time of a decode step of all the rows (Batch.step: forward, masks, the sync), median and 10th
   percentile over every rep (the low percentile is what survives other jobs on the machine);
   each "x" is this mode's speed over free's, so x0.95 is 5% slower.
   Constrained rows follow a schema whose shortest answer is longer than --answer-tokens, so
   they run to the end (a free row may stop at EOS: the table shows the tokens of each mode). Modes alternate within each repetition; medians.
3. Building: the llguidance tokenizer (once per model), a 50-property schema's grammar the
   first time and again (cached), and a row's guide (a copy of the cached matcher).
"""

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mistral_common  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_mistral.serve import Scheduler  # noqa: E402
from mlx_mistral.serve.batch import Batch  # noqa: E402
from mlx_mistral.serve.request import Request  # noqa: E402
from mlx_mistral.structured import Grammars, masked  # noqa: E402
from mlx_mistral.tokenizer import Tokenizer  # noqa: E402
from presets import PRESETS, make_checkpoint  # noqa: E402

STEPS: list[tuple[int, float]] = []  # (rows, seconds) of each decode step (time_steps)
DATA = Path(mistral_common.__file__).parent / "data"
TOKENIZERS = {"v3 SentencePiece": DATA / "mistral_instruct_tokenizer_240323.model.v3",
              "Tekken": DATA / "tekken_240911.json"}
STR = {"type": "string", "maxLength": 16}
NESTED = {"type": "object", "properties": {
    "name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,8}\\.(com|org)$"},
    "address": {"type": "object", "properties": {"street": STR, "city": STR, "zip": {"type": "string",
                                                                                      "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "black"]}, "minItems": 1, "maxItems": 4},
    "score": {"type": "integer", "minimum": -1000, "maximum": 1000}},
    "required": ["name", "age", "email", "address", "tags", "score"], "additionalProperties": False}
LONG = {"type": "object", "properties": {"people": {"type": "array", "items": NESTED, "minItems": 40}},
        "required": ["people"], "additionalProperties": False}  # far longer than any answer here
FIFTY = {"type": "object", "properties": {f"field_{i}": [STR, {"type": "integer"}, {"enum": ["a", "b"]}][i % 3]
                                          for i in range(50)}, "required": [f"field_{i}" for i in range(0, 50, 2)]}


def mask_times(tokenizer: Tokenizer, walks: int) -> dict:
    """Per-token fill (one row's bitmask, llguidance) and whole-mask (masked() on MLX) times, ms."""
    import llguidance.numpy as llnp

    V, rng = tokenizer.vocab_size, np.random.default_rng(0)
    constraint = Grammars(tokenizer).json(NESTED)
    fill, whole, bitmask = [], [], np.zeros((1, (V + 31) // 32), dtype=np.int32)
    logits = mx.zeros((1, V))
    mx.eval(logits)
    for _ in range(walks):
        guide = constraint.guide()
        for _ in range(400):
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask(guide.matcher, bitmask, 0)
            fill.append(time.perf_counter() - t0)
            allowed = np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:V])
            t0 = time.perf_counter()
            mx.eval(masked(logits, {0: guide})[1])
            whole.append(time.perf_counter() - t0)
            token = int(rng.choice(allowed))
            guide.advance(token)
            if token == tokenizer.eos_id:
                break
    return {"vocab": V, "tokens": len(fill), "fill_median_ms": _ms(np.median(fill)),
            "fill_p99_ms": _ms(np.percentile(fill, 99)), "masked_median_ms": _ms(np.median(whole)),
            "masked_p99_ms": _ms(np.percentile(whole, 99))}


def run_clients(sched: Scheduler, prompts: list[list[int]], constraints: list, answer_tokens: int) -> dict:
    """All requests at once; aggregate generated tok/s from the first submit to the last token."""
    ends, lock, done = [], threading.Lock(), threading.Event()

    def sink(event):  # on the scheduler's thread
        if event.finish_reason:
            with lock:
                ends.append((time.perf_counter(), event))
                if len(ends) == len(prompts):
                    done.set()

    STEPS.clear()
    start = time.perf_counter()
    for p, c in zip(prompts, constraints):
        sched.submit(Request(p, answer_tokens, temperature=0.0, constraint=c, sink=sink, reuse=False))
    done.wait()
    if any(e.finish_reason == "error" for _, e in ends):
        raise RuntimeError(f"a row failed: {[e.error for _, e in ends]}")
    tokens = sum(e.generated_tokens for _, e in ends)
    full = [seconds for rows, seconds in STEPS if rows == len(prompts)]
    return {"tok_s": tokens / (max(t for t, _ in ends) - start), "tokens": tokens, "steps": full}


def time_steps() -> None:
    """Batch.step records (rows, seconds) of each decode step in STEPS (forward, masks, sync)."""
    step = Batch.step

    def timed(self, model):
        t0 = time.perf_counter()
        out = step(self, model)  # (tokens, logprobs)
        STEPS.append((len(out[0]), time.perf_counter() - t0))
        return out
    Batch.step = timed


def scheduler_rows(args: argparse.Namespace) -> list[dict]:
    time_steps()
    model_dir = make_checkpoint(args.preset)
    kv = -(-(args.prompt_tokens + args.answer_tokens + 64) // 64) * 64
    sched = Scheduler(str(model_dir), max_batch=args.clients, max_kv_size=kv)
    try:
        constraint = sched.grammars.json(LONG)
        rng = np.random.default_rng(0)
        n = args.clients
        modes = {"all free": [None] * n, "half constrained": [constraint if i % 2 else None for i in range(n)],
                 "all constrained": [constraint] * n}
        prompts = lambda: [[1] + rng.integers(100, 30000, args.prompt_tokens - 1).tolist() for _ in range(n)]
        for constraints in modes.values():  # warm-up
            run_clients(sched, prompts(), constraints, 8)
        runs = {mode: [] for mode in modes}
        for _ in range(args.reps):
            for mode, constraints in modes.items():
                runs[mode].append(run_clients(sched, prompts(), constraints, args.answer_tokens))
                print(mode, round(runs[mode][-1]["tok_s"], 1), "tok/s", file=sys.stderr, flush=True)
    finally:
        sched.close()
        shutil.rmtree(model_dir.parent, ignore_errors=True)  # make_checkpoint's temp dir
    rows = []
    for mode, r in runs.items():
        steps = [t for x in r for t in x["steps"]]
        rows.append({"mode": mode, "tok_s": round(statistics.median(x["tok_s"] for x in r), 1),
                     "runs": [round(x["tok_s"], 1) for x in r], "tokens": [x["tokens"] for x in r],
                     "step_ms": _ms(np.median(steps)), "step_p10_ms": _ms(np.percentile(steps, 10))})
    for r in rows:  # free's / this mode's: x0.95 is 5% slower than free
        r |= {"vs_free": round(r["tok_s"] / rows[0]["tok_s"], 3), "step_vs_free": round(rows[0]["step_ms"] / r["step_ms"], 3),
              "p10_vs_free": round(rows[0]["step_p10_ms"] / r["step_p10_ms"], 3)}
    return rows


def build_times(tokenizer: Tokenizer) -> dict:
    t0 = time.perf_counter()
    grammars = Grammars(tokenizer)
    grammars.ll_tokenizer  # noqa: B018  (built on first use)
    t1 = time.perf_counter()
    constraint = grammars.json(FIFTY)
    t2 = time.perf_counter()
    cached = [_timed(grammars.json, FIFTY) for _ in range(20)]
    guides = [_timed(constraint.guide) for _ in range(100)]
    return {"ll_tokenizer_s": round(t1 - t0, 3), "schema_bytes": len(json.dumps(FIFTY)),
            "first_ms": _ms(t2 - t1), "cached_ms": _ms(np.median(cached)), "guide_ms": _ms(np.median(guides))}


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--walks", type=int, default=20, help="random walks per tokenizer for the mask times")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results = {"mask": {name: mask_times(Tokenizer(path), a.walks) for name, path in TOKENIZERS.items()},
               "build": {name: build_times(Tokenizer(path)) for name, path in TOKENIZERS.items()},
               "scheduler": scheduler_rows(a)}
    if a.json:
        print(json.dumps(results, indent=1))
        return
    print("mask per token (ms):")
    for name, r in results["mask"].items():
        print(f"  {name:17} V={r['vocab']:6} tokens={r['tokens']:5}  fill median {r['fill_median_ms']:.3f} "
              f"p99 {r['fill_p99_ms']:.3f}   masked() median {r['masked_median_ms']:.3f} p99 {r['masked_p99_ms']:.3f}")
    print("grammar build:")
    for name, r in results["build"].items():
        print(f"  {name:17} LLTokenizer {r['ll_tokenizer_s']:.2f} s; 50-property schema ({r['schema_bytes']} B): "
              f"first {r['first_ms']:.2f} ms, cached {r['cached_ms']:.3f} ms; guide {r['guide_ms']:.3f} ms")
    print(f"scheduler, {a.preset}, {a.clients} greedy clients, {a.prompt_tokens}-token prompts, "
          f"{a.answer_tokens}-token answers:")
    for r in results["scheduler"]:
        print(f"  {r['mode']:17} {r['tok_s']:6.1f} tok/s (x{r['vs_free']:.3f}; runs {r['runs']}, tokens {r['tokens']}); "
              f"step of {a.clients} rows: median {r['step_ms']:.1f} ms (x{r['step_vs_free']:.3f}), "
              f"p10 {r['step_p10_ms']:.1f} ms (x{r['p10_vs_free']:.3f})")


if __name__ == "__main__":
    main()
