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


# -----------------------------------------------------------------------------
# A setting of a run, declared once (recipe.py holds train.py's): the command line, the default, the resume
# rule and the help are all derived from its one entry.

KEEP, CHANGE, FREE = "keep", "may change", "free"  # what a resumed run does with a setting (Setting.resume)


class Setting:
    """One setting of a run.

    name     the attribute (`lr_period`); its flag is --lr-period
    domain   a type of this file (POSITIVE_INT, ...), a list of choices, SWITCH (a flag that takes no value),
             or str (a path or a free-form value)
    default  a value, or a rule: a function of (facts, args) -- the family's facts (families.py) and the
             settings resolved before this one (settings resolve in the order they are declared)
    help     what it is; the parser adds the default (a value) or `rule` (the rule's words)
    resume   KEEP: the run's trajectory depends on it, so a resumed run takes it from its checkpoint and
             refuses a command line that contradicts it; CHANGE: taken from the checkpoint unless given,
             and a new value is recorded as a change (lr: continue a diverged run more slowly); FREE: how a
             step is computed or logged, not which step it is (may differ on every resume)
    applies  None (always), or a function of args saying whether this run uses it: given to a run that
             does not use it, the flag is refused in one line (say, --n-tokens with --params lora)
    flag     False for settings whose flag another file declares (--model: models.add_backbone_flags) or
             that are no flag at all (world: the number of ranks torchrun starts)
    """

    def __init__(self, name, domain, default, help, resume, applies=None, rule=None, flag=True, metavar=None):
        self.name, self.domain, self.default, self.help, self.resume = name, domain, default, help, resume
        self.applies, self.rule, self.flag, self.metavar = applies, rule, flag, metavar

    @property
    def option(self):
        return "--" + self.name.replace("_", "-")

    def value_for(self, facts, args):
        """The default of this setting for a run whose earlier settings are `args`."""
        return self.default(facts, args) if callable(self.default) else self.default

    def add_to(self, parser):
        """The flag, with default None: None means "not given" (take the default, or the checkpoint's)."""
        shown = self.rule if self.rule else ("off" if self.domain is SWITCH else self.default)
        text = f"{self.help} (default: {shown})" if shown is not None else self.help
        kwargs = dict(default=None, help=text.replace("%", "%%"))
        if self.domain is SWITCH:
            kwargs.update(action="store_const", const=True)
        elif isinstance(self.domain, (list, tuple)):
            kwargs.update(choices=list(self.domain))
        elif self.domain is not str:
            kwargs.update(type=self.domain)
        if self.metavar:
            kwargs.update(metavar=self.metavar)
        parser.add_argument(self.option, **kwargs)


SWITCH = object()  # Setting.domain of a flag that takes no value
