"""Block families, one module per family. Importing this package registers every block."""

from .attention import CoordinateAttention, GlobalContext, SqueezeExcite
from .base import Block, ShapePreservingBlock, check_input
from .spd import SPDConv, space_to_depth

__all__ = [
    "Block",
    "CoordinateAttention",
    "GlobalContext",
    "SPDConv",
    "ShapePreservingBlock",
    "SqueezeExcite",
    "check_input",
    "space_to_depth",
]
