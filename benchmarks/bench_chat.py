"""Time to first token, turn by turn, of a long chat: with KV cache reuse vs a full re-prefill.

    python benchmarks/bench_chat.py [--model demo | --preset small] [--turns 10] [--answer-tokens 64]

Both runs go through the app's ChatSession on one model with greedy sampling, so they feed
the same tokens and give the same answers (checked); only what is prefilled differs.
"""

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]  # for `app`, presets

from app.chat import ChatSession, Engine, Settings  # noqa: E402
from presets import PRESETS, make_checkpoint  # noqa: E402

QUESTION = ("Turn {n}. Here is some more context about the project we are discussing, its rolling "
            "cache and its sliding window; please summarise what changed and what to try next.")


def run_chat(engine: Engine, reuse: bool, turns: int, settings: Settings) -> list[tuple]:
    """(conversation tokens before the answer, tokens prefilled, ttft, answer) for each turn."""
    session, history, rows = ChatSession(engine, reuse=reuse), [], []
    for n in range(1, turns + 1):
        history.append({"role": "user", "content": QUESTION.format(n=n)})
        text = ""
        for text, _ in session.respond(history, settings):
            pass
        s = session.stats
        rows.append((s.conversation_tokens - s.generated_tokens, s.prompt_tokens, s.ttft, text))
        history.append({"role": "assistant", "content": text})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="checkpoint directory, repo id, or 'demo'")
    p.add_argument("--preset", choices=PRESETS, help="a random-weight checkpoint instead (window 4096)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each chat; the table shows medians")
    p.add_argument("--max-kv-size", type=int)
    args = p.parse_args()
    if not args.preset:
        return bench(args, args.model)
    checkpoint = make_checkpoint(args.preset)
    try:
        return bench(args, str(checkpoint))
    finally:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)


def bench(args: argparse.Namespace, model: str) -> int:
    engine = Engine(model, args.max_kv_size)
    settings = Settings(temperature=0.0, max_tokens=args.answer_tokens)
    run_chat(engine, True, 2, settings)  # warm-up
    runs = {True: [], False: []}
    for _ in range(args.repeats):  # alternated, so that a busy machine slows both alike
        for reuse in (True, False):
            runs[reuse].append(run_chat(engine, reuse, args.turns, settings))
    answers = {reuse: [[row[3] for row in run] for run in r] for reuse, r in runs.items()}
    assert all(a == answers[True][0] for a in answers[True] + answers[False]), "answers differ"

    def ttft_ms(reuse: bool, turn: int) -> float:
        return 1000 * statistics.median(run[turn][2] for run in runs[reuse])

    print(f"model {args.preset or args.model} (KV cache {engine.capacity} tokens), "
          f"{args.answer_tokens}-token greedy answers, median of {args.repeats} runs")
    print("| turn | context tokens | prefilled, reuse | TTFT reuse (ms) | prefilled, no reuse | "
          "TTFT no reuse (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in range(args.turns):
        context, fed_reuse = runs[True][0][t][:2]
        fed_full = runs[False][0][t][1]
        a, b = ttft_ms(True, t), ttft_ms(False, t)
        print(f"| {t + 1} | {context} | {fed_reuse} | {a:.1f} | {fed_full} | {b:.1f} | {b / a:.1f}x |")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
