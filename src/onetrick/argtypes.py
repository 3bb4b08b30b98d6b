"""Comma-separated list options shared by the ``study``, ``bench`` and ``simulate``
commands (argparse ``type=`` callables: a bad value is a one-line usage error)."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def comma_ints(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """:func:`comma_ints`, every value at least 1 (worker counts)."""
    values = comma_ints(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be positive, got {text!r}")
    return values


def comma_choices(allowed: Sequence[str], what: str = "value") -> Callable[[str], list[str]]:
    """A parser of a non-empty comma-separated subset of ``allowed``."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0] if unknown else text!r}; "
                                             f"choose from {', '.join(allowed)}")
        return items
    return parse


def link_mbps(value: str, named: str) -> float:
    """``--link-mbps``: a positive number of Mbit/s (``named``: the word it also takes,
    handled by the caller). ConfigError, one line, otherwise."""
    from .config import ConfigError

    try:
        mbps = float(value)
    except ValueError:
        raise ConfigError(f"--link-mbps expects a number or '{named}' (got {value!r})") from None
    if not mbps > 0:
        raise ConfigError(f"--link-mbps must be positive (got {value})")
    return mbps


def named_link(value: str, names, option: str = "--link") -> str | float:
    """``--link``: one of ``names`` (the named links), ``measured``, or a positive number
    of Mbit/s (returned as a float). ConfigError, one line listing the names, otherwise."""
    from .config import ConfigError

    if value in names or value == "measured":
        return value
    try:
        mbps = float(value)
    except ValueError:
        raise ConfigError(f"unknown link {value!r} for {option}; choose one of: {', '.join(names)}, measured, "
                          f"or a number of Mbit/s") from None
    if not mbps > 0:
        raise ConfigError(f"{option} must be a link name or a positive number of Mbit/s (got {value})")
    return mbps
