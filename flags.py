"""
flags.py: the domain of every number a command line takes, declared once.

Every script and lab tool builds its parser with `Parser` and gives each numeric flag one of the types
below (`type=flags.POSITIVE_INT`, `type=flags.SEED`, ...). A value outside the domain -- 0 where 0 means
nothing, a negative count, nan, inf, 1e30, 2**70 -- is refused by argparse itself, in two lines (the
short usage and the error naming the domain) with exit status 2, before anything is imported or loaded.
Where 0 has a meaning (--threads 0: torch's default, --val-every 0: never), the flag's help says so.

Bounds. Counts are at most 2^31 - 1 and other numbers at most 1e6 unless a type says otherwise: past
that a value is a typing slip (an extra digit, a stray exponent), not a setting, and is better refused
than run into an int64 overflow, a tensor of 2^70 elements or a sample of inf. Seeds take [0, 2^63),
the range every generator here (torch, numpy's SeedSequence) accepts.
"""

import argparse
import math

INT_MAX = 2**31 - 1
FLOAT_MAX = 1e6


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose refusal is two lines whatever the number of flags: a one-line usage
    pointing at --help (argparse's own usage of train.py is 20 lines) and the error. Exit status 2."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [flags]  (--help lists them)\n{self.prog}: error: {message}\n")


class Integer:
    """An integer in [low, high]; `text` says what the domain is in the error."""

    def __init__(self, low, high=INT_MAX, text=None):
        self.low, self.high = low, high
        self.text = text or (f"an integer >= {low}" if high == INT_MAX else f"an integer in [{low}, {high}]")

    def __call__(self, value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.text}, got {value!r}") from None
        if not self.low <= number <= self.high:
            if number > self.high and self.high == INT_MAX:
                raise argparse.ArgumentTypeError(f"expected {self.text} and at most {INT_MAX}, got {value!r}")
            raise argparse.ArgumentTypeError(f"expected {self.text}, got {value!r}")
        return number

    def __repr__(self):
        return self.text


class Real:
    """A finite number in [low, high], or (low, high] with open_low."""

    def __init__(self, low, high=FLOAT_MAX, open_low=False, text=None):
        self.low, self.high, self.open_low = low, high, open_low
        self.text = text or (
            f"a finite number {'>' if open_low else '>='} {low:g} and at most {high:g}"
            if high == FLOAT_MAX
            else f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"
        )

    def __call__(self, value):
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.text}, got {value!r}") from None
        above_low = number > self.low if self.open_low else number >= self.low
        if not (math.isfinite(number) and above_low and number <= self.high):
            raise argparse.ArgumentTypeError(f"expected {self.text}, got {value!r}")
        return number

    def __repr__(self):
        return self.text


POSITIVE_INT = Integer(1)  # a count of steps, images, tokens, ...
NON_NEGATIVE_INT = Integer(0)  # a count where 0 has a meaning the flag's help states
SEED = Integer(0, 2**63 - 1, text="a seed in [0, 2^63)")
THREADS = Integer(0, 1024, text="a thread count in [0, 1024]")
POSITIVE_FLOAT = Real(0, open_low=True)  # a learning rate, a temperature, a scale
NON_NEGATIVE_FLOAT = Real(0)  # a weight or a clip where 0 means off (the help says so)
PROBABILITY = Real(0, 1, text="a probability in [0, 1]")


def integer_in(low, high=INT_MAX):
    """An integer in [low, high], e.g. at least 2 sampling steps: integer_in(2)."""
    return Integer(low, high)


def real_in(low, high, open_low=False):
    """A finite number in [low, high] (or (low, high]), for a flag whose natural bound is not FLOAT_MAX."""
    return Real(low, high, open_low)
