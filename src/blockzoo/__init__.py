"""blockzoo: tested, paper-faithful CNN building blocks for PyTorch.

>>> import blockzoo as bz
>>> block = bz.create_block("se", 64)
"""

from . import layers
from .blocks import *  # noqa: F403  (registers every block)
from .blocks import __all__ as _block_names
from .layers import make_divisible
from .registry import KINDS, BlockInfo, block_info, create_block, list_blocks, register_block

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "BlockInfo",
    "block_info",
    "create_block",
    "layers",
    "list_blocks",
    "make_divisible",
    "register_block",
    *_block_names,
]
