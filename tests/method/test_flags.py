"""Every numeric flag of every script and lab tool has a declared domain (flags.py), refused by the parser
before anything loads. The scripts and their flags are discovered, not listed: every file with a
`__main__` block must expose build_parser(), and every flag of it that takes a number (a type other than
str, or a numeric default) is tried with 0, -1, nan, inf, 1e30 and 2**70. Each must be refused in at most
three lines of stderr without a traceback (exit status 2), or accepted only where the help states what
that value means ("0: never", or a domain "[0, ...")."""

import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest

import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRIED = ["0", "-1", "nan", "inf", "1e30", str(2**70)]


def script_modules():
    """Every module of the project that runs as a command: a top-level file or shapes/X with a __main__ block."""
    found = []
    for folder, package in ((ROOT, ""), (os.path.join(ROOT, "shapes"), "shapes.")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    if 'if __name__ == "__main__"' in f.read():
                        found.append(package + name[:-3])
    return found


SCRIPTS = script_modules()


def parsers(parser, prefix=()):
    """(argv prefix, parser) for the parser and, depth first, every sub-command's parser."""
    yield list(prefix), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, prefix + (name,))


def takes_a_number(action):
    if not action.option_strings or action.nargs == 0:  # positionals are covered by their sub-parsers
        return False
    numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    return (action.type is not None and action.type is not str) or numeric_default


def required_argv(parser, skip):
    """Placeholder values for the required flags other than `skip`, so that only `skip` can be refused."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings and action is not skip:
            argv += [action.option_strings[0], "1" if takes_a_number(action) else "tiny-sd3"]
    return argv


def numeric_flags():
    cases = []
    for module in SCRIPTS:
        build = getattr(importlib.import_module(module), "build_parser", None)
        assert build is not None, f"{module} runs as a command and has no build_parser(): the flag test cannot see it"
        for prefix, parser in parsers(build()):
            for action in parser._actions:
                if takes_a_number(action):
                    cases.append(pytest.param(module, prefix, action.dest, id=f"{module}:{action.option_strings[0]}"))
    return cases


def test_every_script_is_found():
    expected = {"train", "sample", "edit", "eval", "data", "shapes.pretrain", "shapes.bench", "shapes.sweep"}
    assert expected | {"shapes.report", "shapes.counter", "shapes.gpu_jobs"} <= set(SCRIPTS)


@pytest.mark.parametrize("module, prefix, dest", numeric_flags())
def test_a_number_outside_the_domain_is_refused_in_two_lines(module, prefix, dest, capsys):
    top = parser = importlib.import_module(module).build_parser()
    for name in prefix:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    action = next(a for a in parser._actions if a.dest == dest)
    flag = action.option_strings[0]
    assert action.type is not None and action.type is not str, f"{flag} has a numeric default and no type"
    for value in TRIED:
        argv = prefix + required_argv(parser, action) + [flag, value]
        try:
            top.parse_args(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            assert e.code == 2, f"{module} {flag} {value}: exit status {e.code}"
            assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err, err
            assert flag in err or "invalid choice" in err, err
            continue
        said = action.help or ""
        assert f"{value}:" in said or (value == "0" and "[0," in said), (
            f"{module} {flag} accepted {value} and its help does not say what {value} means: {said!r}"
        )


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_still_lists_every_flag(module):
    parser = importlib.import_module(module).build_parser()
    for _, sub in parsers(parser):
        text = sub.format_help()
        assert all(a.option_strings[0] in text for a in sub._actions if a.option_strings), module


def test_the_types_name_their_domain():
    assert flags.POSITIVE_INT("3") == 3 and flags.NON_NEGATIVE_INT("0") == 0 and flags.SEED(str(2**63 - 1)) > 0
    assert flags.POSITIVE_FLOAT("1e-3") == 1e-3 and flags.PROBABILITY("1") == 1.0
    for type_, value, domain in [
        (flags.POSITIVE_INT, "0", "an integer >= 1"),
        (flags.POSITIVE_INT, "2.5", "an integer >= 1"),
        (flags.SEED, str(2**63), "a seed in [0, 2^63)"),
        (flags.THREADS, "-2", "[0, 1024]"),
        (flags.POSITIVE_FLOAT, "0", "> 0"),
        (flags.NON_NEGATIVE_FLOAT, "nan", ">= 0"),
        (flags.PROBABILITY, "1.5", "a probability in [0, 1]"),
        (flags.integer_in(2), "1", "an integer >= 2"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(domain)):
            type_(value)


def test_a_refusal_comes_before_anything_loads():
    """The real command: two lines on stderr, exit status 2, no traceback."""
    done = subprocess.run(
        [sys.executable, "train.py", "--threads", "-2"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "--threads" in lines[1] and "[0, 1024]" in lines[1], done.stderr
