"""The layer every other part of blockzoo builds on: validation, counting and formatting.

``blocks``, ``models``, ``surgery``, ``train`` and ``tools`` import from here; nothing here
imports from them.
"""

from .counting import count_flops, count_parameters, map_elements
from .formatting import FORMATS, format_rows, replace_between_markers
from .validation import (
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
    close_matches,
    require,
)

__all__ = [
    "FORMATS",
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_finite_number",
    "check_fraction",
    "check_layer_spec",
    "check_non_negative_int",
    "check_options",
    "check_positive_int",
    "check_positive_number",
    "close_matches",
    "count_flops",
    "count_parameters",
    "format_rows",
    "map_elements",
    "replace_between_markers",
    "require",
]
