"""The command-line plumbing every example and benchmark script shares (standard library only, so
that ``--help`` and usage errors answer before torch loads).

    from examples.cli import parser, positive_int, run
    ap = parser(__doc__)
    ap.add_argument("--steps", type=positive_int, default=100, help="training steps")
    ...
    if __name__ == "__main__":
        run(main)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from examples.data import DataError, DataUnavailableError

#: what a user can cause (a bad --data file, a missing path, an offline machine): reported in one
#: line; anything else keeps its traceback, which a bug report needs
USER_ERRORS = (DataError, DataUnavailableError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help states it: computed defaults), the
    description as written."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # one line, as every error of these scripts: the usage block would bury it (--help has it)
        fail(f"{message} (see --help)")


def parser(doc: str) -> ArgumentParser:
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def _number(kind, low: float, strict: bool):
    """An argparse ``type``: a finite ``kind`` above ``low`` (or equal to it, ``strict=False``);
    the error names the flag (argparse adds it) and the valid range."""
    want = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low:g}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value
    parse.__name__ = want
    return parse


positive_int = _number(int, 0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0, strict=True)
nonnegative_float = _number(float, 0, strict=False)


def unit_interval(text):
    """An argparse ``type``: a number in [0, 1)."""
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def fail(message: str):
    """End the script as argparse's ``parser.error`` does: ``prog: error: message``, status 2."""
    sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {message}\n")
    sys.exit(2)


def run(main):
    """``main()``, with a user error (USER_ERRORS) reported by :func:`fail`, without a traceback."""
    try:
        return main()
    except USER_ERRORS as e:
        fail(str(e))
