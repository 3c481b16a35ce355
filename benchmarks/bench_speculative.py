"""Speculative decoding on the real model: plain vs prompt lookup vs a draft model in our continuous batch.

    python benchmarks/bench_speculative.py [--batches 1 2 4 8] [--workloads edit quote extract story]
                                           [--max-tokens 160] [--draft-tokens 8] [--lookup-ngram 2:4]
                                           [--mlx-lm] [--draft] [--json] [--png docs/speculative.png]

SmolLM2-135M-Instruct, dequantized to float32 from the installed GGUF (the CPU's fast dtype;
its 4-bit weights go through MLX's CPU quantized matmul, a loop whose cost grows with the rows
of a verify step, so speculation cannot pay with them here), greedy, chat template. Workloads
that copy their prompt (edit: a 60-line Python file with one change asked; quote: answer with
quotes from a passage; extract: JSON fields from a document) and a control that does not
(story). For each batch size, that many requests are submitted at once to one in-process
Scheduler (the server's), each a variant of the workload (another name in the prompt), with
speculation off and with --prompt-lookup. Per run: aggregate decode tok/s (tokens generated /
the time from the first request's first token to the last token), drafts accepted / drafted,
the mean accepted run (accepted drafts per row and step that drafted), target forwards per
emitted token (the rows' steps / their tokens), peak memory, and whether every row's tokens
equal its plain run's (else the first position where they differ). --mlx-lm adds mlx-lm's
speculative decoding (stream_generate with draft_model: the 4-bit copy of SmolLM2 drafting
for the float32 one, --draft-tokens) and its plain decoding, at batch 1, on the same prompts;
--draft a column of ours at every batch size: a second Scheduler with --draft-model, the Q4_1
GGUF drafting for the float32 model (the 4-bit copy of the target, the fair case on a Mac).
A last line checks the window's wrap on the `demo` model (window 64): a 200-token answer with
prompt lookup equals the plain one.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_mistral.serve import Request, Scheduler  # noqa: E402
from mlx_mistral.speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, Lookup, parse_ngram  # noqa: E402
from presets import smollm2_checkpoints  # noqa: E402

NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana"]

INVENTORY = '''"""A small inventory of products, kept in memory."""

from dataclasses import dataclass, field


@dataclass
class Product:
    sku: str
    name: str
    price: float
    quantity: int = 0
    tags: list[str] = field(default_factory=list)


class Inventory:
    def __init__(self):
        self.products: dict[str, Product] = {}

    def add(self, product: Product) -> None:
        if product.sku in self.products:
            raise KeyError(f"duplicate sku {product.sku}")
        self.products[product.sku] = product

    def remove(self, sku: str) -> Product:
        return self.products.pop(sku)

    def restock(self, sku: str, amount: int) -> int:
        if amount <= 0:
            raise ValueError("amount must be positive")
        product = self.products[sku]
        product.quantity += amount
        return product.quantity

    def sell(self, sku: str, amount: int) -> float:
        product = self.products[sku]
        if product.quantity < amount:
            raise ValueError(f"only {product.quantity} left of {product.name}")
        product.quantity -= amount
        return amount * product.price

    def value(self) -> float:
        return sum(p.price * p.quantity for p in self.products.values())

    def tagged(self, tag: str) -> list[Product]:
        return [p for p in self.products.values() if tag in p.tags]

    def cheapest(self) -> Product | None:
        if not self.products:
            return None
        return min(self.products.values(), key=lambda p: p.price)

    def report(self) -> str:
        lines = []
        for p in sorted(self.products.values(), key=lambda p: p.sku):
            lines.append(f"{p.sku}: {p.name} x{p.quantity} at {p.price:.2f}")
        return "\\n".join(lines)
'''

PASSAGE = (
    "The lighthouse at Point Maren was built in 1872 by the engineer Clara Voss. Its lamp burned "
    "whale oil until 1911, when it was converted to kerosene, and it was electrified in 1934. The "
    "tower is 41 metres tall and its light can be seen 22 nautical miles out to sea. During the storm "
    "of 1903 the keeper, Tomas Hale, kept the lamp lit for three nights without sleep, and the "
    "schooner Marigold reached the harbour safely. The lighthouse was automated in 1978 and the "
    "last keeper left the island that autumn. Today the keeper's cottage is a small museum."
)

DOCUMENT = (
    "INVOICE 2024-0117\nIssued: 14 March 2024\nSeller: Northwind Tools Ltd, 12 Harbour Road, "
    "Leith\nBuyer: {name} Carpentry, 3 Mill Lane, Perth\nItems: 4 x chisel set at 23.50; 2 x "
    "workbench at 189.00; 10 x sandpaper pack at 4.25\nTotal due: 514.50 GBP\nPayment terms: 30 "
    "days\nContact: accounts@northwind.example"
)


def workload(kind: str, name: str) -> str:
    if kind == "edit":
        return (
            f"Here is a Python file written by {name}:\n\n```python\n{INVENTORY}```\n\nChange the error "
            f'message in `sell` to say "not enough stock" and show the whole file.'
        )
    if kind == "quote":
        return (
            f"{PASSAGE}\n\n{name} asks: who built the lighthouse, when was it electrified, and what did "
            f"the keeper do in 1903? Answer with exact quotes from the passage."
        )
    if kind == "extract":
        return (
            f"{DOCUMENT.format(name=name)}\n\nExtract the invoice number, issue date, seller, buyer, "
            "items and total as a JSON object."
        )
    return f"Write a short story about a fox named {name} who learns to sail."


def run(sched: Scheduler, prompts: list[list[int]], max_tokens: int, speculate: bool) -> dict:
    before = sched.stats()
    start = time.perf_counter()
    requests = [
        sched.submit(Request(p, max_tokens=max_tokens, speculate=speculate, reuse=False)) for p in prompts
    ]
    tokens, firsts, ends = [], [], []
    for r in requests:
        events = list(r.events())
        tokens.append([e.token for e in events if e.token is not None])
        firsts.append(start + events[0].ttft)
        ends.append(events[-1])
    wall = time.perf_counter() - start
    stats = sched.stats()
    delta = {
        k: stats[k] - before[k]
        for k in ("drafted_tokens", "accepted_tokens", "verify_steps", "drafting_rows")
    }
    generated = sum(map(len, tokens))
    forwards = sum(e.forwards for e in ends)
    return dict(
        tokens=tokens,
        generated=generated,
        seconds=wall,
        tps=generated / (max(start + wall - min(firsts), 1e-9)),
        forwards_per_token=forwards / generated,
        peak_mib=max(e.peak_memory for e in ends) / 2**20,
        acceptance=delta["accepted_tokens"] / max(delta["drafted_tokens"], 1),
        mean_run=delta["accepted_tokens"] / max(delta["drafting_rows"], 1),
        **delta,
    )


def divergence(plain: list[list[int]], spec: list[list[int]]) -> str:
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"row {i} from token {at}"
    return "identical"


def mlx_lm_anchor(paths: dict, q4: dict, prompts: list[list[int]], max_tokens: int, k: int) -> dict:
    from mlx_lm import load as lm_load
    from mlx_lm.generate import stream_generate as lm_stream

    model, tok = lm_load(paths["mlx_lm"])
    draft, _ = lm_load(q4["mlx_lm"])
    out = {}
    for name, kw in (("plain", {}), ("draft", dict(draft_model=draft, num_draft_tokens=k))):
        generated, seconds, accepted = 0, 0.0, 0
        for p in prompts:
            first = None
            for r in lm_stream(model, tok, p, max_tokens=max_tokens, **kw):
                first = first or time.perf_counter()
                generated += 1
                accepted += bool(getattr(r, "from_draft", False))
                if r.finish_reason:
                    break
            seconds += time.perf_counter() - first
        out[name] = dict(tps=generated / seconds, accepted=accepted, generated=generated)
    return out


def wrap_check(max_tokens: int = 200) -> str:
    sched = Scheduler("demo", max_batch=2, lookup=Lookup(), prompt_cache_bytes=0)
    ids = sched.tokenizer.encode("The window slides on. " * 30, bos=True)
    plain = run(sched, [ids], max_tokens, False)
    spec = run(sched, [ids], max_tokens, True)
    sched.close()
    return (
        f"demo (window {sched.window}): prompt {len(ids)} + {max_tokens} tokens past the wrap: "
        f"{divergence(plain['tokens'], spec['tokens'])}, {spec['forwards_per_token']:.2f} forwards a token, "
        f"{spec['accepted_tokens']}/{spec['drafted_tokens']} drafts accepted"
    )


def plot(rows: list[dict], path: str) -> None:
    """Prompt lookup's speedup over plain decoding and its forwards per token, per workload and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == kind]
        batches = [r["batch"] for r in mine]
        left.plot(batches, [r["lookup"]["tps"] / r["plain"]["tps"] for r in mine], marker="o", label=kind)
        right.plot(batches, [r["lookup"]["forwards_per_token"] for r in mine], marker="o", label=kind)
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(
        xscale="log",
        xlabel="batch (concurrent requests)",
        ylabel="tok/s, prompt lookup / plain",
        title="Speedup (SmolLM2-135M float32, 2-core CPU)",
    )
    right.set(
        xscale="log",
        xlabel="batch (concurrent requests)",
        ylabel="target forwards per token",
        title="Forwards per emitted token",
        ylim=(0, 1.1),
    )
    for ax in (left, right):
        ax.set_xticks([r["batch"] for r in rows if r["workload"] == rows[0]["workload"]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workloads", nargs="+", default=["edit", "quote", "extract", "story"])
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS)
    p.add_argument("--lookup-ngram", default=":".join(map(str, DEFAULT_NGRAM)), metavar="MIN:MAX")
    p.add_argument("--mlx-lm", action="store_true", help="add mlx-lm's draft-model decoding at batch 1")
    p.add_argument("--draft", action="store_true",
                   help="add our draft-model decoding (the Q4_1 GGUF drafting)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--png", help="also plot the speedups and forwards per token to this file")
    a = p.parse_args()
    paths = smollm2_checkpoints("float32")
    sched = Scheduler(
        paths["mlx_mistral"],
        max_batch=max(a.batches),
        max_kv_size=2048,
        lookup=Lookup(a.draft_tokens, parse_ngram(a.lookup_ngram)),
        prompt_cache_bytes=0,
    )
    dsched = None
    if a.draft:
        dsched = Scheduler(paths["mlx_mistral"], max_batch=max(a.batches), max_kv_size=2048,
                           draft_model="smollm2", draft_tokens=a.draft_tokens, prompt_cache_bytes=0)
    tok = sched.tokenizer
    rows, anchors = [], {}
    print(
        f"SmolLM2-135M-Instruct float32, greedy, {a.max_tokens} tokens at most, "
        f"--draft-tokens {a.draft_tokens}, --lookup-ngram {a.lookup_ngram}"
    )
    print(
        f"{'workload':8} {'batch':>5} {'plain tok/s':>11} {'lookup tok/s':>12} {'speedup':>7} "
        f"{'accepted':>13} {'mean run':>8} {'fwd/token':>9} {'peak MiB':>8}  output"
    )
    for kind in a.workloads:
        for batch in a.batches:
            prompts = [
                tok.chat_tokens([{"role": "user", "content": workload(kind, NAMES[i % len(NAMES)])}])
                for i in range(batch)
            ]
            plain = run(sched, prompts, a.max_tokens, False)
            spec = run(sched, prompts, a.max_tokens, True)
            same = divergence(plain["tokens"], spec["tokens"])
            drafted = run(dsched, prompts, a.max_tokens, True) if dsched else None
            rows.append(
                dict(
                    workload=kind,
                    batch=batch,
                    prompt_tokens=len(prompts[0]),
                    output=same,
                    plain={k: v for k, v in plain.items() if k != "tokens"},
                    lookup={k: v for k, v in spec.items() if k != "tokens"},
                )
            )
            if drafted:
                rows[-1]["draft"] = {k: v for k, v in drafted.items() if k != "tokens"}
                rows[-1]["draft_output"] = divergence(plain["tokens"], drafted["tokens"])
            print(
                f"{kind:8} {batch:5} {plain['tps']:11.1f} {spec['tps']:12.1f} "
                f"{spec['tps'] / plain['tps']:6.2f}x {spec['accepted_tokens']:6}/{spec['drafted_tokens']:<6} "
                f"{spec['mean_run']:8.2f} "
                f"{spec['forwards_per_token']:9.2f} {spec['peak_mib']:8.0f}  {same}",
                flush=True,
            )
            if a.mlx_lm and batch == 1:
                q4 = smollm2_checkpoints("q4_1")
                anchors[kind] = sched.call(mlx_lm_anchor, paths, q4, prompts, a.max_tokens, a.draft_tokens)
                m = anchors[kind]
                print(
                    f"{'':8} mlx-lm batch 1: plain {m['plain']['tps']:.1f} tok/s, 4-bit draft model "
                    f"{m['draft']['tps']:.1f} tok/s ({m['draft']['tps'] / m['plain']['tps']:.2f}x, "
                    f"{m['draft']['accepted']}/{m['draft']['generated']} tokens from the draft)",
                    flush=True,
                )
            if drafted:
                print(
                    f"{'':8} {'':5} Q4_1 draft model: {drafted['tps']:.1f} tok/s "
                    f"({drafted['tps'] / plain['tps']:.2f}x), {drafted['accepted_tokens']}/"
                    f"{drafted['drafted_tokens']} accepted, {drafted['forwards_per_token']:.2f} forwards a "
                    f"token, {drafted['peak_mib']:.0f} MiB, {rows[-1]['draft_output']}",
                    flush=True,
                )
    sched.close()
    if dsched:
        dsched.close()
    if a.png:
        plot(rows, a.png)
    wrap = wrap_check()
    print(wrap)
    if a.json:
        print(
            json.dumps(
                dict(rows=rows, mlx_lm=anchors, wrap=wrap, device=str(mx.default_device()))
            )
        )


if __name__ == "__main__":
    main()
