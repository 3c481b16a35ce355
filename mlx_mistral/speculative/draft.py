"""A draft model: a smaller model with the target's tokenizer proposes k tokens a step from its
own rolling cache, which takes back what the target rejects as the target's does
(RollingKVCache.rewind). Greedy requests get its argmax (sample and compare); sampled ones its
draws with the request's own picker (temperature, top-k/p, seed), which the target's rejection
sampling (speculative.rejection) turns into the target's distribution."""

import mlx.core as mx

from ..errors import MistralError
from ..layered_cache import make_cache
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
    """One row's draft model proposer, with PromptLookup's interface: `extend` with the row's
    tokens (its prompt first), `propose`, `update` with what was accepted. The tokens given but
    not yet fed to the draft wait in `pending`, and go in with the next proposal. With a
    sampling `pick` (make_picker at temperature > 0) it samples its drafts, and `q` holds the
    last proposal's log-probabilities [k, V] (None: greedy drafts)."""

    def __init__(self, model: Mistral, k_max: int, tokens: list[int], max_kv_size: int,
                 prefill_chunk: int = 512, pick: Picker | None = None):
        self.model, self.pace, self.pick, self.q = model, Pace(k_max), pick, None
        self.cache = make_cache(
            model.args, max_kv_size, dtype=model.dtype, headroom=k_max, warn_on_roll=False
        )
        self.pending: list[int] = []
        self.fed = 0  # of the last proposal's drafts, those in the cache (all but the last)
        x, step = mx.array(tokens[:-1], dtype=mx.uint32)[None], min(prefill_chunk, self.cache.window)
        for start in range(0, len(tokens) - 1, step):
            model(x[:, start : start + step], self.cache)
            mx.eval(self.cache.keys, self.cache.values)
        self.pending = tokens[-1:]

    def extend(self, tokens: list[int]) -> None:
        self.pending += tokens[self.fed :]  # the accepted drafts are in the cache already
        self.fed = 0

    def propose(self, limit: int) -> list[int]:
        k = self.pace.budget(limit)
        if k <= 0:
            return []
        drafts, q = [], []
        x = mx.array(self.pending, dtype=mx.uint32)[None]
        self.pending = []
        for i in range(k):
            logits = self.model(x, self.cache)[:, -1]
            if self.pick is None:
                y = mx.argmax(logits, axis=-1)
            else:  # the draw of the token at this position (the cache's offset)
                y, w = self.pick(logits, [self.cache.offset])
                q.append(w - mx.logsumexp(w, axis=-1, keepdims=True))
            drafts.append(y)
            if i + 1 < k:
                x = y[:, None].astype(mx.uint32)
        self.fed = k - 1
        self.q = mx.concatenate(q) if q else None
        return mx.concatenate(drafts).tolist()

    def update(self, drafted: int, accepted: int) -> None:
        """Take back the rejected drafts the cache holds (it holds all but the last one)."""
        self.pace.update(drafted, accepted)
        keep = min(accepted, self.fed)  # (a grammar may have cut the drafts the target saw)
        self.cache.rewind([self.fed - keep])
        self.fed = keep


def load_draft(path: str, tokenizer: TextTokenizer, **kwargs) -> Mistral:
    """The draft model at `path` (any name loading.load takes), checked against the target's
    `tokenizer` (MistralError: another vocabulary, template or special tokens)."""
    from ..loading import load

    model, draft_tokenizer = load(path, **kwargs)
    check_same_tokenizer(tokenizer, draft_tokenizer, path)
    return model
