"""argparse types and help formatting the ``paged-kv`` commands share, and the words
their messages use (flags rather than API field names, plurals that agree)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from paged_kv.words import plural  # re-exported: the CLI modules import it from here


def integer(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


positive_int = integer(1)
"""An argparse type: an integer >= 1."""


def number(low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a float in [low, high), or >= low when ``high`` is None."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low and (high is None or value < high)):  # NaN fails both
            bound = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return number


def finite(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return value


def positive_size(text: str) -> float:
    """An argparse type: a finite number > 0 (a size such as ``--pool-gib 16`` or ``0.5``)."""
    value = finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` only where it tells the reader something: not on a required
    option, a flag that is off unless given, an option whose absence means "not used"
    (None), or one whose help already says what its default is (argparse's own
    formatter printed "(default: None)" on most options and a second default there)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text or not action.option_strings):  # `is`: a default of 0 is still shown
            return text
        return super()._get_help_string(action)  # type: ignore[return-value]  # never None: argparse reads a missing help as ""


_FOR_MEMORY = re.compile(r"(?:or )?size the pool with CacheSpec\.for_memory\(bytes, \.\.\.\)")


def in_flag_words(message: str, flags: dict[str, str], for_memory: str) -> str:
    """``message`` (a `CacheSpec` error, in its API's words) with every field of ``flags``
    named as a user typed it: ``field=value`` becomes ``--flag value`` (a ``flags`` entry
    holding ``{}`` puts the value there instead: ``"{} blocks per sequence"``), a bare
    field name becomes the flag, and the advice to size the pool with
    ``CacheSpec.for_memory`` becomes ``for_memory`` (the flag that does it on this
    command). A command-line user never typed the API's names."""
    for field in sorted(flags, key=len, reverse=True):  # sliding_num_blocks before num_blocks
        words = flags[field]

        def named(match: re.Match[str], words: str = words) -> str:
            value = match.group(1)
            if "{}" in words:
                return words.format("" if value is None else value).strip()
            return words if value is None else f"{words} {value}"

        message = re.sub(rf"(?<![\w-]){field}(?:=([^\s,;)]+))?(?!\w)", named, message)
    message = message.replace("check these fields", "check these flags")
    return _FOR_MEMORY.sub(for_memory, message)


__all__ = ["HelpFormatter", "finite", "in_flag_words", "integer", "number", "plural", "positive_int", "positive_size"]
