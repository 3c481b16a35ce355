"""How wide a verify step is: the drafts every row may feed (the batch's L - 1), chosen for the
most tokens per second. One row's drafts make every row of the batch pay for L positions, so
spurious drafts slow a busy batch: the step is as wide as the rows' expected gain pays for."""

DECAY = 0.97  # of the older timings, at each new one
PRIOR_SLOPE = 0.05  # until timings vary: each position of the batch costs this share of a one-token step


class Width:
    """Times steps as seconds = a + b * (rows x positions), fitted by least squares that forget
    (DECAY), and picks L maximising (rows + expected accepted drafts) / (a + b * rows * L). A row
    whose drafts are each accepted with probability p (its recent rate) is expected to keep
    p + p^2 + ... + p^j of its first j drafts."""

    def __init__(self):
        self.sums = None  # weight, x, y, xx, xy

    def observe(self, positions: int, seconds: float) -> None:
        """One step of `positions` rows x L took `seconds`."""
        if self.sums is None:  # the prior: a line through this step with PRIOR_SLOPE
            base = seconds / (1 + PRIOR_SLOPE * (positions - 1))
            self.sums = [0.0] * 5
            for x in (1, 16):
                self._add(x, base * (1 + PRIOR_SLOPE * (x - 1)))
        self.sums = [s * DECAY for s in self.sums]
        self._add(positions, seconds)

    def _add(self, x: float, y: float) -> None:
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self.sums[i] += v

    def line(self) -> tuple[float, float]:
        n, x, y, xx, xy = self.sums
        b = max((n * xy - x * y) / max(n * xx - x * x, 1e-12), 0.0)
        return max((y - b * x) / n, 1e-9), b

    def choose(self, drafts: list[int], rates: list[float]) -> int:
        """The drafts a row may feed this step (0: a plain step), given each row's drafts and rate."""
        longest = max(drafts, default=0)
        if longest == 0 or self.sums is None:
            return longest
        a, b = self.line()
        rows = len(drafts)
        best, width = rows / (a + b * rows), 0
        gain = 0.0
        for j in range(1, longest + 1):
            gain += sum(p ** j for n, p in zip(drafts, rates) if n >= j)
            speed = (rows + gain) / (a + b * rows * (j + 1))
            if speed > best:
                best, width = speed, j
        return width
