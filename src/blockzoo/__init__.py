"""blockzoo: tested, paper-faithful CNN building blocks for PyTorch.

>>> import blockzoo as bz
>>> block = bz.create_block("se", 64)
"""

from . import layers, models, surgery
from .blocks import *  # noqa: F403  (registers every block)
from .blocks import __all__ as _block_names
from .layers import make_divisible
from .models import create_model, list_models, model_info
from .registry import KINDS, BlockInfo, block_info, create_block, list_blocks, register_block
from .surgery import insert_after, insert_before, replace_convs
from .tools.profile import ProfileResult, compare, profile
from .train.inference import load_trained

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "BlockInfo",
    "ProfileResult",
    "compare",
    "create_model",
    "list_models",
    "load_trained",
    "model_info",
    "models",
    "insert_after",
    "insert_before",
    "replace_convs",
    "surgery",
    "profile",
    "block_info",
    "create_block",
    "layers",
    "list_blocks",
    "make_divisible",
    "register_block",
    *_block_names,
]
