"""Depthwise separable convolution.

Xception: Deep Learning with Depthwise Separable Convolutions, Chollet, CVPR 2017,
arXiv 1610.02357
"""

from __future__ import annotations

import torch

from ..core.validation import check_positive_int
from ..layers import ConvNormAct, LayerSpec
from ..registry import register_block
from .base import Block


@register_block(
    "separable_conv",
    kind="conv",
    paper="Xception: Deep Learning with Depthwise Separable Convolutions",
    arxiv="1610.02357",
    year=2017,
    summary="A depthwise k x k conv (spatial) followed by a pointwise 1x1 conv (channels).",
)
class SeparableConv(Block):
    """Depthwise separable convolution (Chollet, Xception, arXiv 1610.02357).

    A ``kernel_size`` x ``kernel_size`` depthwise conv (``groups = in_channels``, ``stride``,
    ``dilation``, ``depth_multiplier`` filters per channel) maps each channel on its own; a 1x1
    pointwise conv then mixes channels::

        y = act(norm(W_pw * mid_act(mid_norm(W_dw (*) x))))

    Weights: ``k^2 * C_in * m`` (depthwise) plus ``C_in * m * C_out`` (pointwise), against
    ``k^2 * C_in * C_out`` for a full conv.

    Defaults: 3x3, ``depth_multiplier=1``, nothing between the two convs
    (``mid_norm_layer=None``, ``mid_act_layer=None``: the paper finds that a non-linearity
    between depthwise and pointwise hurts, its Fig. 10, and Keras' ``SeparableConv2D`` has none),
    then BatchNorm and ReLU after the pointwise conv (``norm_layer``, ``act_layer``; pass
    ``act_layer=None`` for Xception's and NASNet's ``ReLU -> sepconv -> BN`` ordering with the
    ReLU outside). The depthwise conv has no bias; the pointwise conv has one only when
    ``norm_layer=None``. Submodules: ``dw`` and ``pw``, each a ``ConvNormAct``.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))``, ``stride``
    1 or 2 (the strides Xception and the mobile networks use).
    """

    conv_preservation = (
        "a depthwise k x k conv followed by a pointwise 1x1 conv has kernels of the form "
        "W[o, i] = P[o, i] * D[i], so it reproduces a dense conv only in special cases (and "
        "BatchNorm and ReLU follow it by default)"
    )
    ends_with_norm_act = True

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        depth_multiplier: int = 1,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        mid_norm_layer: LayerSpec = None,
        mid_act_layer: LayerSpec = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_int(name, "kernel_size", kernel_size, odd=True)
        check_positive_int(name, "dilation", dilation)
        check_positive_int(name, "depth_multiplier", depth_multiplier)
        self.check_layers(norm_layer=norm_layer, act_layer=act_layer,
                          mid_norm_layer=mid_norm_layer, mid_act_layer=mid_act_layer)
        mid = in_channels * depth_multiplier
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.depth_multiplier = depth_multiplier
        self.dw = ConvNormAct(
            in_channels, mid, kernel_size, stride, dilation, groups=in_channels,
            norm_layer=mid_norm_layer, act_layer=mid_act_layer, bias=False,
        )
        self.pw = ConvNormAct(mid, self.out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.pw(self.dw(x))
