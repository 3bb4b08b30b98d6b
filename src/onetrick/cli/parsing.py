"""What every command's parser shares: :class:`OneLineParser` (a usage error is one line;
one help format) and the comma-separated list options of ``study``, ``bench`` and
``simulate`` (argparse ``type=`` callables: a bad value is a one-line usage error)."""
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


def fractions(text: str) -> tuple[float, ...]:
    """``0.5,0.75`` -> ``(0.5, 0.75)`` (argparse names this function in its error)."""
    return tuple(float(x) for x in text.split(","))


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows each option's default once, readably: ``(default: 0.5,0.75)``, never a
    Python tuple, never ``(default: None)``, nothing where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or action.option_strings == [] or default in (None, False, True, [], ())
                or default is argparse.SUPPRESS):
            return text
        if isinstance(default, (tuple, list)):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem, and every command
    shares one help format (:class:`DefaultsFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = DefaultsFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
