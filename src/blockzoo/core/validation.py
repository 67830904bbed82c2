"""Argument checks shared by every block, model and tool: one rule, one message form.

Every message starts with the owner's name (``"SqueezeExcite: reduction must be ..."``), so a
user can tell which block or model refused the value.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Iterable


def require(owner: str, condition: bool, message: str) -> None:
    """Raise ``ValueError("<owner>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{owner}: {message}")


def check_positive_int(owner: str, name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` is refused), else a ``ValueError``."""
    require(
        owner,
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be a positive integer, got {value!r}",
    )
    return value


def close_matches(name: str, known: Iterable[str], n: int = 3) -> str:
    """``"; did you mean a, b?"`` for up to ``n`` close matches of ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def cli_int(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` ``type``: an integer ``>= minimum`` (``0`` is a value, never "unset")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def cli_float(minimum: float, maximum: float = math.inf, *, strict: bool = False
              ) -> Callable[[str], float]:
    """An ``argparse`` ``type``: a finite float in ``[minimum, maximum)`` (``(minimum, ...)``
    with ``strict``); ``maximum`` is excluded unless infinite."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if strict else value >= minimum
        if not math.isfinite(value) or not low_ok or not value < maximum:
            low = f"> {minimum:g}" if strict else f">= {minimum:g}"
            high = f" and < {maximum:g}" if math.isfinite(maximum) else ""
            raise argparse.ArgumentTypeError(f"must be a finite number {low}{high}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
