"""Fused CPU operators behind involution, ACmix's window attention and deformable convolution.

Each family's file registers its kernels as PyTorch custom operators (``torch.library``, with fake
implementations and autograd formulas), so ``torch.compile(fullgraph=True)`` sees one operator per
call. The blocks call them through :func:`use_fast_path`; where that is false (numba missing,
switched off, another device or dtype, ONNX export) they run their PyTorch reference forms.
"""

from ._backend import (
    ENV_DISABLE,
    fast_ops,
    fast_ops_available,
    fast_ops_enabled,
    path_description,
    use_fast_path,
)
from .acmix import window_attention, window_attention_add_, window_attention_backward
from .deform import deform_conv2d, deform_conv2d_backward, deform_conv2d_op, finite_offset
from .grouped_conv import grouped_conv2d
from .involution import involution_aggregate, involution_aggregate_backward

__all__ = [
    "ENV_DISABLE",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_conv2d_op",
    "fast_ops",
    "fast_ops_available",
    "fast_ops_enabled",
    "finite_offset",
    "grouped_conv2d",
    "involution_aggregate",
    "involution_aggregate_backward",
    "path_description",
    "use_fast_path",
    "window_attention",
    "window_attention_add_",
    "window_attention_backward",
]
