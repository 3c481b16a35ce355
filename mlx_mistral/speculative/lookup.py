"""Prompt lookup: a row's drafts are the tokens that followed the latest earlier occurrence of
its last n tokens (the longest n from max down to min) in its own prompt and answer. No second
model: edits, quotes and extractions copy long runs of their prompt, which this finds."""

from dataclasses import dataclass

from ..errors import MistralError

DEFAULT_DRAFT_TOKENS = 8
DEFAULT_NGRAM = (2, 4)
MAX_SKIP = 16  # steps a row drafts nothing after its drafts keep failing, at most


@dataclass(frozen=True)
class Lookup:
    """The settings: up to `draft_tokens` drafts a step from n-grams of `ngram` = (min, max) tokens."""

    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ngram: tuple[int, int] = DEFAULT_NGRAM

    def __post_init__(self):
        k, (lo, hi) = self.draft_tokens, self.ngram
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise MistralError(f"draft_tokens must be an integer from 1 to 64, got {k!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (lo, hi)) or not 1 <= lo <= hi <= 32:
            raise MistralError(f"lookup n-gram sizes must be MIN:MAX with 1 <= MIN <= MAX <= 32, got {lo!r}:{hi!r}")


def parse_ngram(text: str) -> tuple[int, int]:
    """"MIN:MAX" (or "N") -> (min, max); MistralError naming the flag's form otherwise."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise MistralError(f"--lookup-ngram must be MIN:MAX (such as 2:4), got {text!r}")
    return parts[0], parts[-1]


class PromptLookup:
    """One row's proposer: `extend` it with every token the row gets (its prompt first), ask it
    for drafts, tell it how many were accepted. An index maps each n-gram whose next token is
    known to where that token is (the latest occurrence): O(max - min) a token, O(max - min) a
    proposal. How many it drafts adapts to what the row accepts: all of them, up to two more;
    some, one more than that; none, half as many and a pause of 1, 2, 4 ... MAX_SKIP steps."""

    def __init__(self, settings: Lookup, tokens: list[int]):
        self.k_max, (self.lo, self.hi) = settings.draft_tokens, settings.ngram
        self.k, self.skip, self.backoff = self.k_max, 0, 1
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the new token's position: it follows the n-grams ending before it
            for n in range(self.lo, min(self.hi, end) + 1):
                self.index[tuple(self.tokens[end - n:end])] = end

    def propose(self, limit: int) -> list[int]:
        """Up to min(k, limit) drafts to follow the tokens so far (none while pausing)."""
        if self.skip:
            self.skip -= 1
            return []
        k = min(self.k, limit)
        if k <= 0:
            return []
        for n in range(min(self.hi, len(self.tokens)), self.lo - 1, -1):
            at = self.index.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at:at + k]
        return []

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == 0:
            self.k, self.skip = max(1, self.k // 2), self.backoff
            self.backoff = min(2 * self.backoff, MAX_SKIP)
            return
        self.backoff = 1
        self.k = min(self.k_max, accepted + (2 if accepted == drafted else 1))
