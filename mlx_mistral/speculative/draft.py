"""A draft model: a smaller model with the target's tokenizer proposes k tokens a step from its
own rolling cache, which takes back what the target rejects as the target's does
(RollingKVCache.rewind). Greedy requests get its argmax (sample and compare); sampled ones its
draws with the request's own picker (temperature, top-k/p, seed), which the target's rejection
sampling (speculative.rejection) turns into the target's distribution."""

import mlx.core as mx

from ..errors import MistralError
from ..layered_cache import KVCache, make_cache
from ..model import Mistral
from ..sample import Picker
from ..text import TextTokenizer
from .lookup import Pace

PROBE = [{"role": "user", "content": "Hello there: check the template."}]


def check_same_tokenizer(target: TextTokenizer, draft: TextTokenizer, where: str) -> None:
    """MistralError unless `draft` spells every id as `target` does, with the same special ids and
    chat template (a draft's tokens are fed to the target as they are)."""
    if draft.vocab_size != target.vocab_size or draft.piece_bytes != target.piece_bytes:
        raise MistralError(
            f"draft model {where} has another vocabulary than the model ({draft.vocab_size} "
            f"tokens vs {target.vocab_size}): a draft model needs the same tokenizer"
        )
    if (draft.bos_id, draft.eos_id) != (target.bos_id, target.eos_id) or draft.chat_tokens(
        PROBE
    ) != target.chat_tokens(PROBE):
        raise MistralError(
            f"draft model {where} has another chat template or special tokens than the model: "
            "a draft model needs the same tokenizer and instruct version"
        )


class DraftModel:
    """A draft model's proposals for the rows of a batch (one row for stream_generate), from its
    own cache of those rows, in their order: `join` rows with their prompts, `propose` each row
    up to its budget, `update` with what each row emitted, `keep` the rows that stay. Every
    step feeds each row the tokens it emitted that the draft has not seen (one or two, padded
    and taken back), so its cache follows the target's. With a sampling picker for a row
    (make_picker at temperature > 0) that row's drafts are its draws, `q[b]` their
    log-probabilities [k, V] (None: argmax drafts)."""

    def __init__(self, model: Mistral, headroom: int, max_kv_size: int | None, prefill_chunk: int = 512):
        self.model, self.headroom, self.max_kv_size = model, headroom, max_kv_size
        self.prefill_chunk = prefill_chunk
        self.cache: KVCache | None = None
        self.pending: list[list[int]] = []  # each row's tokens not yet fed
        self.q: list[mx.array | None] = []
        self.fed = 0  # of the last proposal's drafts, those in the cache (all but the last)

    def join(self, prompts: list[list[int]]) -> None:
        """New rows after the others, their prompts prefilled but the last token (MistralError
        when a prompt is empty)."""
        for tokens in prompts:
            cache = make_cache(self.model.args, self.max_kv_size, dtype=self.model.dtype,
                               headroom=self.headroom, warn_on_roll=False)
            x, step = mx.array(tokens[:-1], dtype=mx.uint32)[None], min(self.prefill_chunk, cache.window)
            for start in range(0, len(tokens) - 1, step):
                self.model(x[:, start:start + step], cache)
                mx.eval(cache.keys, cache.values)
            if self.cache is None:
                self.cache = cache
            else:
                self.cache.extend(cache)
            self.pending.append(list(tokens[-1:]))

    def keep(self, rows: list[int]) -> None:
        self.pending = [self.pending[b] for b in rows]
        if rows:
            self.cache.keep(rows)
        else:
            self.cache = None

    def propose(self, budgets: list[int], picks: list[Picker | None]) -> list[list[int]]:
        """Row b's drafts, budgets[b] at most: all rows draft max(budgets) (one forward each)."""
        lengths = [len(p) for p in self.pending]
        width = max(lengths)
        x = mx.array([p + p[-1:] * (width - len(p)) for p in self.pending], dtype=mx.uint32)
        logits = self.model(x, self.cache)
        logits = logits[mx.arange(len(lengths)), mx.array(lengths) - 1]  # each row's last real token's
        self.cache.rewind([width - n for n in lengths])
        self.pending = [[] for _ in lengths]
        k = max(budgets)
        drafts, q = [], [[] for _ in lengths]
        for i in range(k):
            y = mx.argmax(logits, axis=-1)
            for b, pick in enumerate(picks):
                if pick is not None:  # this row's draw at this position (its cache offset)
                    y_b, w = pick(logits[b:b + 1], [self.cache.offsets[b]])
                    y[b] = y_b[0].astype(y.dtype)
                    q[b].append(w - mx.logsumexp(w, axis=-1, keepdims=True))
            drafts.append(y)
            if i + 1 < k:
                logits = self.model(y[:, None].astype(mx.uint32), self.cache)[:, -1]
        self.fed = max(k - 1, 0)
        self.q = [mx.concatenate(rows) if rows else None for rows in q]
        if not k:  # only fed: evaluated now, lest the lazy graph grow step after step
            mx.eval(self.cache.keys, self.cache.values)
            return [[] for _ in lengths]
        tokens = mx.stack(drafts, axis=1).tolist()
        return [row[:n] for row, n in zip(tokens, budgets)]

    def update(self, accepted: list[int], runs: list[list[int]]) -> None:
        """Row b kept its first accepted[b] drafts and emitted runs[b] (those, then one more):
        the cache takes back the rest of its drafts, the tokens it has not seen wait."""
        keep = [min(n, self.fed) for n in accepted]
        self.cache.rewind([self.fed - n for n in keep])
        self.pending = [p + run[n:] for p, run, n in zip(self.pending, runs, keep)]
        self.fed = 0


class DraftRow:
    """A one-row DraftModel with PromptLookup's interface (stream_generate's proposer)."""

    def __init__(self, model: Mistral, k_max: int, tokens: list[int], max_kv_size: int | None,
                 prefill_chunk: int = 512, pick: Picker | None = None):
        self.draft = DraftModel(model, k_max, max_kv_size, prefill_chunk)
        self.draft.join([tokens])
        self.pace, self.pick, self.q = Pace(k_max), pick, None
        self.run: list[int] = []
        self.accepted = 0

    def extend(self, tokens: list[int]) -> None:
        self.run = tokens

    def propose(self, limit: int) -> list[int]:
        if self.run:  # what the target emitted since the last proposal
            self.draft.update([self.accepted], [self.run])
        drafts = self.draft.propose([self.pace.budget(limit)], [self.pick])[0]
        self.q, self.accepted = self.draft.q[0], 0
        return drafts

    def update(self, drafted: int, accepted: int) -> None:
        self.pace.update(drafted, accepted)
        self.accepted = accepted


def load_draft(path: str, tokenizer: TextTokenizer, **kwargs) -> Mistral:
    """The draft model at `path` (any name loading.load takes), checked against the target's
    `tokenizer` (MistralError: another vocabulary, template or special tokens)."""
    from ..loading import load

    model, draft_tokenizer = load(path, **kwargs)
    check_same_tokenizer(tokenizer, draft_tokenizer, path)
    return model
