"""One interface over two sources of choices: Hypothesis (shrinkable, for the
CI property tests) and random.Random (fast, for the long runs).

Generators take a ``src`` and call only these methods, so the same code
drives both ``@given(st.data())`` tests and the million-message scripts.
"""

import random


class RandomSource:
    def __init__(self, seed=None):
        self.r = random.Random(seed)

    def int(self, lo, hi):
        return self.r.randint(lo, hi)

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]

    def bool(self, p=0.5):
        return self.r.random() < p

    def bytes(self, n):
        return self.r.getrandbits(8 * n).to_bytes(n, "little") if n else b""


class HypothesisSource:
    """Wraps the ``data`` object of ``@given(st.data())``."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.data = data
        self.st = st

    def int(self, lo, hi):
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self, p=0.5):
        # Hypothesis shrinks booleans towards False; p is only a hint here.
        return self.data.draw(self.st.booleans())

    def bytes(self, n):
        return self.data.draw(self.st.binary(min_size=n, max_size=n))
