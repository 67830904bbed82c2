"""MobileNetV2's inverted residual block with a linear bottleneck.

- MobileNetV2: Inverted Residuals and Linear Bottlenecks, Sandler et al., CVPR 2018,
  arXiv 1801.04381
- The ``attention=`` placement follows Coordinate Attention for Efficient Mobile Network Design,
  Hou et al., CVPR 2021, arXiv 2103.02907 (its MobileNetV2 puts the attention block after the
  depthwise conv's BN and ReLU6, on the expanded channels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.counting import map_elements
from ..core.validation import check_positive_number
from ..layers import LayerSpec
from ..registry import register_block
from .base import Block
from .residual import attention_block, conv_unit


@register_block(
    "inverted_residual",
    kind="block",
    paper="MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    arxiv="1801.04381",
    year=2018,
    summary="1x1 expand -> 3x3 depthwise -> linear 1x1 projection; residual when shapes match.",
)
class InvertedResidual(Block):
    """MobileNetV2 inverted residual block (Sandler et al., arXiv 1801.04381, Table 1).

    ``1x1 conv in -> hidden + BN + ReLU6 -> 3x3 depthwise conv (stride) + BN + ReLU6 -> 1x1
    conv hidden -> out + BN`` (the linear bottleneck: no activation at the end), with
    ``hidden = round(in * expand_ratio)`` (``t = 6``). ``expand_ratio=1`` drops the expansion
    conv, as in MobileNetV2's first block. ``out = x + F(x)`` only when ``stride == 1`` and
    ``in == out``; otherwise ``out = F(x)``.

    ``conv`` names a conv-kind block (``"dynamic_conv"``, ...) that takes the place of every
    convolution of the block (expansion 1x1, depthwise 3x3 and projection 1x1), built with that
    conv's channels, stride, kernel size and groups, no bias, and ``conv_kwargs`` (see
    :func:`~blockzoo.blocks.residual.conv_unit`), as DY-MobileNetV2 does.

    ``attention`` names an attention-kind block (``"coord_att"``, ``"se"``, ...) built on the
    ``hidden`` channels with ``attention_kwargs`` and applied after the depthwise conv's BN and
    ReLU6, before the projection, as coordinate attention's MobileNetV2 does (its reference
    code leaves it out of the ``t = 1`` block; here it is applied whenever it is asked for).

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / stride), ceil(W / stride))``, stride 1 or 2.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        expand_ratio: float = 6,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        conv: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        act_layer: LayerSpec = "relu6",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        check_positive_number(type(self).__name__, "expand_ratio", expand_ratio)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        hidden = round(in_channels * expand_ratio)
        self.require(hidden >= 1, f"round({in_channels} * {expand_ratio}) gives no channels")
        self.hidden_channels = hidden
        self.use_residual = self.stride == 1 and in_channels == self.out_channels
        swap = dict(conv=conv, conv_kwargs=conv_kwargs, norm_layer=norm_layer)
        self.expand: nn.Module = (
            nn.Identity() if expand_ratio == 1
            else conv_unit(self, in_channels, hidden, 1, act_layer=act_layer, **swap)
        )
        self.depthwise = conv_unit(
            self, hidden, hidden, 3, stride, groups=hidden, act_layer=act_layer, **swap
        )
        self.attention = attention_block(self, attention, hidden, attention_kwargs)
        self.project = conv_unit(self, hidden, self.out_channels, 1, act_layer=None, **swap)
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = self.project(self.attention(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y

    def extra_flops(self, x: torch.Tensor) -> int:
        """The residual add (stride 1, same width), one per output value."""
        return 2 * map_elements(x) if self.use_residual else 0
