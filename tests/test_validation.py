"""The shared argument checks of ``blockzoo.core.validation``: one rule and one message form."""

from __future__ import annotations

import math

import pytest
from torch import nn

from blockzoo.core.validation import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_finite_number,
    check_fraction,
    check_layer_spec,
    check_non_negative_int,
    check_options,
    check_positive_int,
    check_positive_number,
)


def test_positive_int_refuses_bools_floats_strings_and_non_positive_values() -> None:
    assert check_positive_int("Owner", "k", 3) == 3
    assert check_positive_int("Owner", "k", 5, odd=True) == 5
    for value in (True, 2.0, "3", None, math.inf):
        with pytest.raises(ArgumentTypeError, match=r"^Owner: k must be a positive integer"):
            check_positive_int("Owner", "k", value)
    for value in (0, -2):
        with pytest.raises(ValueError, match=r"^Owner: k must be a positive integer, got"):
            check_positive_int("Owner", "k", value)
    with pytest.raises(ValueError, match="k must be a positive odd integer, got 4"):
        check_positive_int("Owner", "k", 4, odd=True)
    assert check_non_negative_int("Owner", "n", 0) == 0
    with pytest.raises(ValueError, match="n must be a non-negative integer, got -1"):
        check_non_negative_int("Owner", "n", -1)


def test_numbers_fractions_bools_and_choices() -> None:
    assert check_positive_number("Owner", "r", 0.5) == 0.5
    for value in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="r must be positive and finite"):
            check_positive_number("Owner", "r", value)
    with pytest.raises(ArgumentTypeError):
        check_positive_number("Owner", "r", "4")
    with pytest.raises(ValueError, match=r"r must be a finite number >= 1, got 0.5"):
        check_positive_number("Owner", "r", 0.5, minimum=1)
    assert check_finite_number("Owner", "b", -1.5) == -1.5
    for value in (math.inf, math.nan, "1", True):
        with pytest.raises(ValueError, match="b must be a finite number"):
            check_finite_number("Owner", "b", value)
    assert check_fraction("Owner", "p", 0) == 0
    for value in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
            check_fraction("Owner", "p", value)
    assert check_bool("Owner", "b", False) is False
    for value in (1, "yes", None):
        with pytest.raises(ArgumentTypeError, match="b must be True or False"):
            check_bool("Owner", "b", value)
    assert check_choice("Owner", "pool", "avg", ("att", "avg")) == "avg"
    with pytest.raises(ValueError, match="pool must be one of .* got 'atn'; did you mean att"):
        check_choice("Owner", "pool", "atn", ("att", "avg"))
    assert check_options("Owner", "kw", None) == {}
    with pytest.raises(ArgumentTypeError, match="kw must be a dict"):
        check_options("Owner", "kw", [("a", 1)])


def test_layer_specs_take_names_classes_factories_and_activation_instances() -> None:
    known = ("relu", "silu")
    for spec in (None, "relu", "ReLU", nn.SiLU, lambda: nn.ReLU()):
        check_layer_spec("Owner", "act_layer", spec, known, what="activation", instances=True)
    check_layer_spec("Owner", "act_layer", nn.ReLU(), known, what="activation", instances=True)
    with pytest.raises(ArgumentTypeError, match="norm_layer must be .* not a module instance"):
        check_layer_spec("Owner", "norm_layer", nn.BatchNorm2d(4), ("bn",), what="norm layer",
                         instances=False)
    with pytest.raises(ValueError, match="act_layer: unknown activation 'rleu'; did you mean relu"):
        check_layer_spec("Owner", "act_layer", "rleu", known, what="activation", instances=True)
    with pytest.raises(ArgumentTypeError, match="act_layer must be None, one of the activation"):
        check_layer_spec("Owner", "act_layer", 3, known, what="activation", instances=True)
