"""Prompt lookup: a row's drafts are the tokens that followed the latest earlier occurrence of
its last n tokens (the longest n from max down to min) in its own prompt and answer. No second
model: edits, quotes and extractions copy long runs of their prompt, which this finds."""

from dataclasses import dataclass

from ..errors import MistralError

DEFAULT_DRAFT_TOKENS = 8
DEFAULT_NGRAM = (2, 4)
MAX_SKIP = 16  # steps a row drafts nothing after its drafts keep failing, at most
RATE_DECAY = 0.8  # of the older steps in a row's acceptance rate, at each new one


@dataclass(frozen=True)
class Lookup:
    """The settings: up to `draft_tokens` drafts a step from n-grams of `ngram` = (min, max) tokens."""

    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ngram: tuple[int, int] = DEFAULT_NGRAM

    def __post_init__(self):
        k, (lo, hi) = self.draft_tokens, self.ngram
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise MistralError(f"draft_tokens must be an integer from 1 to 64, got {k!r}")
        ints = all(isinstance(n, int) and not isinstance(n, bool) for n in (lo, hi))
        if not ints or not 1 <= lo <= hi <= 32:
            raise MistralError(f"lookup n-gram sizes must be MIN:MAX with 1 <= MIN <= MAX <= 32, "
                               f"got {lo!r}:{hi!r}")


def add_arguments(p) -> None:
    """The command lines' --prompt-lookup, --lookup-ngram, --draft-model and --draft-tokens (read
    by from_arguments)."""
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculate with prompt lookup: draft the tokens that followed the latest match of "
                   "the last n tokens in the prompt and answer, keep what the model agrees with (the same "
                   "output, fewer forwards where the answer copies the prompt)")
    p.add_argument("--draft-model", metavar="PATH",
                   help="speculate with this smaller model's drafts (the same tokenizer and chat template, "
                   "checked; any name --model takes)")
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS,
                   help=f"drafts a step at most, with --prompt-lookup or --draft-model (default "
                   f"{DEFAULT_DRAFT_TOKENS}; each cache gets as many slots past its window)")
    p.add_argument("--lookup-ngram", default=":".join(map(str, DEFAULT_NGRAM)), metavar="MIN:MAX",
                   help="with --prompt-lookup: n-gram sizes matched, longest first (default %(default)s)")


def from_arguments(args) -> Lookup | None:
    """The Lookup of add_arguments' flags (None without --prompt-lookup); MistralError if bad
    (--draft-tokens is checked with --draft-model too)."""
    if args.prompt_lookup and args.draft_model:
        raise MistralError("--prompt-lookup and --draft-model: choose one")
    if args.draft_model:
        Lookup(args.draft_tokens)
    return Lookup(args.draft_tokens, parse_ngram(args.lookup_ngram)) if args.prompt_lookup else None


def parse_ngram(text: str) -> tuple[int, int]:
    """"MIN:MAX" (or "N") -> (min, max); MistralError naming the flag's form otherwise."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise MistralError(f"--lookup-ngram must be MIN:MAX (such as 2:4), got {text!r}")
    return parts[0], parts[-1]


class Pace:
    """How many drafts a row proposes, adapted to what it accepts: all of them, up to two more
    (at most k_max); some, one more than were accepted; none, half as many and a pause of 1, 2,
    4 ... MAX_SKIP steps (so a row whose drafts keep failing soon stops paying for them). `rate`:
    the chance that the next draft is accepted, from recent steps (accepted drafts over drafts
    tried, a rejection being a try: a geometric run's estimate), for width.Width."""

    def __init__(self, k_max: int):
        self.k_max = self.k = k_max
        self.skip, self.backoff = 0, 1
        self.passes, self.tries = 0.0, 0.0

    @property
    def rate(self) -> float:
        return (self.passes + 1) / (self.tries + 2)

    def withheld(self) -> None:
        """Its drafts were not worth a verify step: what it did long ago counts less, so that its
        rate drifts back to the prior (1/2) and a row that starts copying later is tried again."""
        self.passes, self.tries = RATE_DECAY * self.passes, RATE_DECAY * self.tries

    def budget(self, limit: int) -> int:
        """Drafts for this step, at most `limit` (0 while pausing)."""
        if self.skip:
            self.skip -= 1
            return 0
        return max(0, min(self.k, limit))

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.passes = RATE_DECAY * self.passes + accepted
        self.tries = RATE_DECAY * self.tries + accepted + (accepted < drafted)
        if accepted == 0:
            self.k, self.skip = max(1, self.k // 2), self.backoff
            self.backoff = min(2 * self.backoff, MAX_SKIP)
            return
        self.backoff = 1
        self.k = min(self.k_max, accepted + (2 if accepted == drafted else 1))


class PromptLookup:
    """One row's proposer: `extend` it with every token the row gets (its prompt first), ask it
    for drafts, tell it how many were accepted (its Pace adapts). An index maps each n-gram whose
    next token is known to where that token is (the latest occurrence): O(max - min) a token,
    O(max - min) a proposal."""

    q = None  # its drafts are not sampled (see DraftModel.q)

    def __init__(self, settings: Lookup, tokens: list[int]):
        self.lo, self.hi = settings.ngram
        self.pace = Pace(settings.draft_tokens)
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
        """Up to the Pace's number of drafts (at most `limit`) to follow the tokens so far."""
        k = self.pace.budget(limit)
        if k <= 0:
            return []
        for n in range(min(self.hi, len(self.tokens)), self.lo - 1, -1):
            at = self.index.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at:at + k]
        return []

    def update(self, drafted: int, accepted: int) -> None:
        self.pace.update(drafted, accepted)
