"""One rank of test_distributed's two-process runs: python distributed_rank.py OUT_DIR MODEL...

Started with MLX_RANK and MLX_HOSTFILE set (as mlx.launch would), it loads this rank's share
of each model and saves what `observe` sees to OUT_DIR/rank{r}-{i}.npz. The test process
calls `observe` on the whole model too and compares.
"""

import sys
import warnings

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_mistral import batch_stream_generate, distributed, make_cache, make_sampler, shard, stream_generate

PROMPT = list(range(300, 323))  # 23 tokens: past the tiny models' window of 8
BATCH = [list(range(400, 405)), list(range(500, 511))]


def observe(model, tokenizer, sampler) -> dict[str, np.ndarray]:
    """Logits of PROMPT fed in chunks of 5 (the window wraps mid-chunk), greedy tokens of
    stream_generate and batch_stream_generate, and the bytes this process holds."""
    cache = make_cache(model.args, 16, dtype=model.dtype)
    with warnings.catch_warnings():  # a windowless model rolls past 16 slots, as intended here
        warnings.simplefilter("ignore", UserWarning)
        logits = mx.concatenate([model(mx.array([PROMPT[i:i + 5]]), cache)[0] for i in range(0, len(PROMPT), 5)])
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=8, sampler=sampler)]
    batch = [[], []]
    for i, r in batch_stream_generate(model, tokenizer, BATCH, max_tokens=6, sampler=sampler):
        batch[i].append(r.token)
    sharded = shard.sharded_bytes(model)
    return {"logits": np.array(logits), "tokens": np.array(tokens), "batch": np.array(batch[0] + [-1] + batch[1]),
            "sharded_bytes": np.array(sharded), "kv_bytes": np.array(cache.nbytes),
            "other_bytes": np.array(sum(v.nbytes for _, v in tree_flatten(model.parameters())) - sharded)}


def main(out: str, models: list[str]) -> int:
    group = distributed.init(30)
    for i, path in enumerate(models):
        model, tokenizer = distributed.load(path, group)
        with distributed.rank_zero_output(group):
            seen = observe(model, tokenizer, distributed.shared_sampler(make_sampler(), group))
        np.savez(f"{out}/rank{group.rank()}-{i}.npz", **seen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
