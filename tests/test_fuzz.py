"""Constructor fuzz over every registered block: a bad argument is refused when the block is built.

Each keyword argument of each block's constructor gets values that are invalid for its type
(from the constructor's annotations): a bool or a string for a number, a non-finite or negative
number, an unknown layer name, a norm-layer instance, ... Every such value must be refused at
construction with blockzoo's own ``ValueError``/``TypeError`` naming the block or the argument;
nothing may reach torch and fail at the first forward. The hypothesis test mixes valid and
invalid values for several arguments at once: whatever it builds must run.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import blockzoo as bz

from .contract import main_config

NAMES = bz.list_blocks()
SKIP = {"self", "in_channels", "out_channels", "stride", "device", "dtype"}
ACT_ARGS = {"act_layer", "gate_layer", "mid_act_layer"}
NORM_ARGS = {"norm_layer", "mid_norm_layer"}


@dataclass(frozen=True)
class Case:
    name: str
    arg: str
    value: Any

    def __str__(self) -> str:
        return f"{self.name}-{self.arg}={self.value!r}"


def _kind(annotation: Any, arg: str) -> str:
    """What an argument is, from its annotation: int, float, bool, act, norm, block, ..."""
    if arg in ACT_ARGS:
        return "act"
    if arg in NORM_ARGS:
        return "norm"
    if arg in ("attention", "conv"):
        return "block"
    args = set(typing.get_args(annotation)) - {type(None)}
    if annotation is bool:
        return "bool"
    if annotation is int or args == {int}:
        return "int"
    if annotation is float or args == {float}:
        return "float"
    if args == {int, str}:
        return "padding"
    if typing.get_origin(annotation) is typing.Literal or annotation is str:
        return "choice"
    if typing.get_origin(annotation) is dict or dict in map(typing.get_origin, args):
        return "dict"
    return "sequence"


#: Values that are wrong for every argument of a kind.
BAD: dict[str, list[Any]] = {
    "int": [True, 2.5, "3", math.inf, -1],
    "float": [True, "4", math.inf, math.nan],
    "bool": ["yes", 2, None],
    "act": [3, "no_such_activation"],
    "norm": [3, "no_such_norm", nn.BatchNorm2d(8)],
    "block": [3, "no_such_block"],
    "padding": [True, -1, 2.5, "valid"],
    "choice": [3, "no_such_choice"],
    "dict": [3, "options"],
    "sequence": [3, "3", [True], [2.5]],
}


def _arguments(name: str) -> dict[str, str]:
    cls = bz.block_info(name).cls
    hints = typing.get_type_hints(cls.__init__)
    return {arg: _kind(hints.get(arg), arg) for arg in bz.block_info(name).defaults
            if arg not in SKIP}


def _build(name: str, **kwargs: Any) -> nn.Module:
    cfg = main_config(name)
    return bz.create_block(name, cfg.in_channels, **{**cfg.kwargs, **kwargs})


def _forward(name: str, block: nn.Module) -> torch.Tensor:
    """The block on a ``(2, C, 8, 8)`` input (and a cell's second input, ``prev``)."""
    x = torch.randn(2, main_config(name).in_channels, 8, 8)
    inputs = [x]
    if hasattr(block, "prev_channels"):
        inputs.append(torch.randn(2, block.prev_channels, 8, 8))
    with torch.no_grad():
        return block.eval()(*inputs)


def _block_classes() -> set[str]:
    found, todo = set(), [bz.Block]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found


BLOCK_CLASSES = _block_classes()


def _is_ours(err: Exception, arg: str) -> bool:
    """A ``ValueError``/``TypeError`` that starts with a block's name or names the argument."""
    message = str(err)
    return isinstance(err, (ValueError, TypeError)) and (
        message.split(":", 1)[0] in BLOCK_CLASSES or bool(arg) and arg in message
    )


def classify(case: Case) -> str:
    """``"ours"`` (refused at construction by blockzoo), ``"foreign"`` (refused at construction
    by something else), ``"forward"`` (built, failed at forward) or ``"accepted"``."""
    try:
        block = _build(case.name, **{case.arg: case.value})
    except Exception as err:  # noqa: BLE001 - the classification is the point
        return "ours" if _is_ours(err, case.arg) else "foreign"
    try:
        _forward(case.name, block)
    except Exception:  # noqa: BLE001
        return "forward"
    return "accepted"


def bad_cases() -> list[Case]:
    return [
        Case(name, arg, value)
        for name in NAMES
        for arg, kind in _arguments(name).items()
        for value in BAD[kind]
    ]


CASES = bad_cases()


def test_every_block_has_fuzzed_arguments() -> None:
    fuzzed = {case.name for case in CASES}
    assert fuzzed == set(NAMES) - {n for n in NAMES if not _arguments(n)}
    assert len(CASES) > 200


@pytest.mark.parametrize("name", NAMES)
def test_bad_constructor_arguments_are_refused_at_construction(name: str) -> None:
    outcomes = {str(case): classify(case) for case in CASES if case.name == name}
    wrong = {case: outcome for case, outcome in outcomes.items() if outcome != "ours"}
    assert not wrong, wrong


@pytest.mark.parametrize("name", [n for n in NAMES if ACT_ARGS & set(_arguments(n))])
def test_activation_instances_are_accepted_and_copied(name: str) -> None:
    args = [a for a in _arguments(name) if a in ACT_ARGS]
    act = nn.LeakyReLU(0.25)
    block = _build(name, **{a: act for a in args})
    y = _forward(name, block)
    assert torch.isfinite(y).all()
    leaky = [m for m in block.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and all(m is not act and m.negative_slope == 0.25 for m in leaky)


def _values(kind: str, default: Any) -> st.SearchStrategy:
    good: dict[str, list[Any]] = {
        "int": [1, 2, 3, 4],
        "float": [0.5, 1, 2.0, 4, 16],
        "bool": [True, False],
        "act": ["relu", "silu", None, nn.GELU],
        "norm": ["batchnorm", "groupnorm", None],
        "block": [None],
        "padding": ["same", 0, 1],
        "choice": [],
        "dict": [None],
        "sequence": [None],
    }
    return st.sampled_from([default, *good[kind], *BAD[kind]])


@pytest.mark.parametrize("name", NAMES)
def test_random_constructor_arguments_fail_at_construction_or_run(name: str) -> None:
    arguments = _arguments(name)
    defaults = bz.block_info(name).defaults
    kwargs = st.fixed_dictionaries(
        {}, optional={a: _values(k, defaults[a]) for a, k in arguments.items()}
    )

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kwargs)
    def check(kw: dict[str, Any]) -> None:
        try:
            block = _build(name, **kw)
        except (ValueError, TypeError) as err:
            assert _is_ours(err, "") or any(_is_ours(err, a) for a in kw), err
            return
        y = _forward(name, block)
        assert y.shape[0] == 2

    check()


#: The constructor defects reported against the blocks: (block, argument, value, wrong type?).
REPORTED = [
    ("se", "rd_channels", 0, False),
    ("coord_att", "min_channels", 0, False),
    ("coord_att", "min_channels", -3, False),
    ("spd_conv", "kernel_size", "3", True),
    ("gc", "ratio", math.inf, False),
    ("se", "reduction", "4", True),
    ("residual", "attention", 3, False),
    ("dynamic_conv", "bias", "yes", True),
    ("separable_conv", "kernel_size", True, True),
    ("dynamic_conv", "reduction", math.inf, False),
    ("se", "gate_layer", "sigmoidd", False),
    ("inverted_residual", "norm_layer", nn.BatchNorm2d(16), True),
]


@pytest.mark.parametrize(("name", "argument", "value", "wrong_type"), REPORTED)
def test_reported_constructor_defects_are_refused_at_construction(
    name: str, argument: str, value: Any, wrong_type: bool
) -> None:
    cls = bz.block_info(name).cls.__name__
    with pytest.raises(ValueError, match=f"^{cls}: {argument}") as err:
        bz.create_block(name, 16, **{argument: value})
    assert isinstance(err.value, TypeError) == wrong_type  # ArgumentTypeError for a wrong type


def test_activation_instance_is_copied_and_a_norm_instance_refused() -> None:
    block = bz.create_block("se", 16, act_layer=nn.ReLU())
    assert isinstance(block.act, nn.ReLU)
    assert block(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    with pytest.raises(TypeError, match="norm_layer must be .* not a module instance"):
        bz.create_block("coord_att", 16, norm_layer=nn.BatchNorm2d(8))
