"""Argument checks shared by every block, model and tool: one rule, one message form.

Every message starts with the owner's name (``"SqueezeExcite: reduction must be ..."``) and
names the argument and the rule, so a user can tell which block refused which value and why.
A value of the right type outside the allowed range is a ``ValueError``; a value of the wrong
type an :class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError`` (the
contract's error for any bad argument). ``bool`` is never taken for a number.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError`` that is also the contract's ``ValueError``."""


def require(owner: str, condition: bool, message: str) -> None:
    """Raise ``ValueError("<owner>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{owner}: {message}")


def _require_type(owner: str, condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentTypeError(f"{owner}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(owner: str, name: str, value: object, *, odd: bool = False) -> int:
    """``value`` if it is an ``int`` >= 1 (and odd when ``odd``), else an error naming ``name``.

    A non-integer (``bool``, ``float``, ``str``, ...) is an :class:`ArgumentTypeError`, an
    integer below 1 or an even one where ``odd`` is asked a ``ValueError``.
    """
    rule = "a positive odd integer" if odd else "a positive integer"
    _require_type(owner, _is_int(value), f"{name} must be {rule}, got {value!r}")
    require(owner, value >= 1 and (not odd or value % 2 == 1), f"{name} must be {rule}, "
            f"got {value!r}")
    return value


def check_non_negative_int(owner: str, name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 0 (``bool`` is refused), else an error naming ``name``."""
    _require_type(owner, _is_int(value), f"{name} must be a non-negative integer, got {value!r}")
    require(owner, value >= 0, f"{name} must be a non-negative integer, got {value!r}")
    return value


def check_finite_number(owner: str, name: str, value: object) -> float:
    """``value`` if it is a finite ``int``/``float`` (``bool`` is refused), else an error."""
    _require_type(owner, _is_number(value), f"{name} must be a finite number, got {value!r}")
    require(owner, math.isfinite(value), f"{name} must be a finite number, got {value!r}")
    return value


def check_positive_number(
    owner: str, name: str, value: object, *, minimum: float | None = None
) -> float:
    """``value`` if it is a finite ``int``/``float`` > 0 (>= ``minimum`` when given)."""
    rule = "positive and finite" if minimum is None else f"a finite number >= {minimum}"
    _require_type(owner, _is_number(value), f"{name} must be {rule}, got {value!r}")
    in_range = value > 0 if minimum is None else value >= minimum
    require(owner, math.isfinite(value) and in_range, f"{name} must be {rule}, got {value!r}")
    return value


def check_fraction(owner: str, name: str, value: object) -> float:
    """``value`` if it is a number in ``[0, 1)`` (a dropout rate), else an error naming it."""
    rule = "a number in [0, 1)"
    _require_type(owner, _is_number(value), f"{name} must be {rule}, got {value!r}")
    require(owner, 0 <= value < 1, f"{name} must be {rule}, got {value!r}")
    return value


def check_bool(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (``True``/``False``; not ``1``, ``"yes"`` or ``None``)."""
    _require_type(owner, isinstance(value, bool), f"{name} must be True or False, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``choices``, else an error with close matches."""
    choices = tuple(choices)
    hint = close_matches(value, choices) if isinstance(value, str) else ""
    require(owner, isinstance(value, str) and value in choices,
            f"{name} must be one of {choices}, got {value!r}{hint}")
    return value


def check_layer_spec(
    owner: str,
    name: str,
    spec: object,
    known: Iterable[str],
    *,
    what: str,
    instances: bool,
) -> None:
    """Check a layer spec: ``None``, a name in ``known``, a class or a factory callable.

    ``what`` says what the layer is in messages (``"activation"``, ``"norm layer"``).
    An ``nn.Module`` instance is accepted only where ``instances`` is true (an activation,
    copied for each use); a norm layer needs its channel count, so an instance is refused.
    """
    if spec is None or isinstance(spec, type) and issubclass(spec, nn.Module):
        return
    if isinstance(spec, nn.Module):
        _require_type(
            owner, instances,
            f"{name} must be one of the {what} names, a class or a factory taking the channel "
            f"count, not a module instance (pass {type(spec).__name__}, not {spec!r})",
        )
        return
    if isinstance(spec, str):
        known = sorted(known)
        key = spec.lower().replace("-", "_")
        require(owner, key in known,
                f"{name}: unknown {what} {spec!r}{close_matches(key, known)} (choose one of "
                f"{known})")
        return
    _require_type(
        owner, isinstance(spec, Callable),
        f"{name} must be None, one of the {what} names, an nn.Module class or a callable, "
        f"got {spec!r}",
    )


def check_options(owner: str, name: str, value: object) -> dict[str, Any]:
    """``value`` (``None`` -> ``{}``) if it is a dict of keyword arguments."""
    value = {} if value is None else value
    _require_type(
        owner, isinstance(value, dict) and all(isinstance(k, str) for k in value),
        f"{name} must be a dict of keyword arguments or None, got {value!r}",
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
