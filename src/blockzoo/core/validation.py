"""Argument checks shared by every block, model and tool: one rule, one message form.

Every message starts with the owner's name (``"SqueezeExcite: reduction must be ..."``), so a
user can tell which block or model refused the value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
