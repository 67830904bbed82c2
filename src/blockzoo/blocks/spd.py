"""SPD-Conv: space-to-depth followed by a non-strided convolution, and the SPD bottleneck.

No More Strided Convolutions or Pooling: A New CNN Building Block for Low-Resolution Images and
Small Objects, Sunkara & Luo, ECML PKDD 2022, arXiv 2208.03641
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.validation import check_positive_int
from ..layers import ConvNormAct, LayerSpec, create_act, create_norm
from ..registry import register_block
from .base import Block
from .residual import ResidualBlock, bottleneck_width


def space_to_depth(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """``(N, C, H, W) -> (N, scale^2 * C, ceil(H / scale), ceil(W / scale))``, losing no value.

    Odd sizes are zero-padded at the bottom/right first. Channel block ``b = j * scale + i``
    holds ``x[..., i::scale, j::scale]`` (rows offset ``i``, columns offset ``j``), the order of
    the SPD-Conv reference code: for scale 2, ``[x00, x10, x01, x11]``.
    """
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (-w) % scale, 0, (-h) % scale))
    return torch.cat(
        [x[..., i::scale, j::scale] for j in range(scale) for i in range(scale)], dim=1
    )


@register_block(
    "spd_conv",
    kind="downsample",
    paper="No More Strided Convolutions or Pooling: A New CNN Building Block for "
    "Low-Resolution Images and Small Objects",
    arxiv="2208.03641",
    year=2022,
    summary="Downsamples by space-to-depth (no information lost), then a non-strided conv.",
    strides=(2, 3),
    notes="stride is the space-to-depth scale: 1 is rejected; 2 is the default.",
)
class SPDConv(Block):
    """SPD-Conv (Sunkara & Luo, arXiv 2208.03641).

    ``space_to_depth`` with ``scale = stride`` (default 2): ``C -> scale^2 C`` channels and
    ``ceil(H / scale) x ceil(W / scale)`` positions (odd sizes zero-padded), then a non-strided
    ``kernel_size`` conv (3x3 default; 1 allowed) + BatchNorm + SiLU as in the YOLO variant
    (``act_layer=None`` drops the activation).

    Shapes: ``(N, C, H, W) -> (N, out_channels, ceil(H / s), ceil(W / s))``.
    """

    conv_preservation = (
        "space-to-depth followed by a convolution, BatchNorm and an activation is not linear in "
        "its input, and blockzoo has no initialiser that rewrites a strided kernel for the "
        "space-to-depth layout, so it cannot start as the strided convolution it replaces"
    )
    ends_with_norm_act = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 2,
        *,
        kernel_size: int = 3,
        act_layer: LayerSpec = "silu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.require(
            stride >= 2,
            f"stride is the space-to-depth scale and must be at least 2, got {stride}",
        )
        check_positive_int(type(self).__name__, "kernel_size", kernel_size, odd=True)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        self.conv = ConvNormAct(
            in_channels * stride * stride,
            self.out_channels,
            kernel_size,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.conv(space_to_depth(x, self.stride))


class SpaceToDepth(nn.Module):
    """:func:`space_to_depth` as a module: ``C -> scale^2 C`` channels."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SPDBottleneck(ResidualBlock):
    """ResNet bottleneck whose downsampling is a space-to-depth, as in the SPD-Conv reference
    ResNet-50 (Sunkara & Luo, arXiv 2208.03641; LabSAINT/SPD-Conv ``resnet50_spd.py``).

    Stride 1: the ResNet bottleneck ``1x1 (in -> D) -> 3x3 (D -> D) -> 1x1 (D -> out)``, each
    conv + BN, ReLU after the first two. Stride 2: the 3x3 conv keeps stride 1 and is followed by
    ``space_to_depth`` (scale 2, ``D -> 4D`` channels, ``ceil(H / 2)`` positions), then BN + ReLU
    over ``4D`` channels, and the last 1x1 conv maps ``4D -> out`` (+ BN). The shortcut is the
    reference's: identity, or a 1x1 conv with the stride + BN when the shape changes (the
    reference keeps this strided 1x1 conv). ``D = out / expansion``.

    ``attention``, ``attention_kwargs`` and ``zero_init_last`` as in
    :class:`~blockzoo.blocks.residual.ResidualBottleneck`.

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / stride), ceil(W / stride))``, stride 1 or 2.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        expansion: int = 4,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        zero_init_last: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        width = bottleneck_width(self, self.out_channels, expansion, 1, 64)
        self.width = width
        if self.stride == 1:
            conv2: nn.Module = ConvNormAct(
                width, width, 3, norm_layer=norm_layer, act_layer=act_layer
            )
            mid = width
        else:
            mid = 4 * width
            conv2 = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(width, width, 3, padding=1, bias=False),
                spd=SpaceToDepth(2),
                bn=create_norm(norm_layer, mid),
                act=create_act(act_layer, inplace=True),
            ))
        body = nn.Sequential(OrderedDict(
            conv1=ConvNormAct(in_channels, width, 1, norm_layer=norm_layer, act_layer=act_layer),
            conv2=conv2,
            conv3=ConvNormAct(mid, self.out_channels, 1, norm_layer=norm_layer, act_layer=None),
        ))
        self._add_shortcut(
            body, attention=attention, attention_kwargs=attention_kwargs,
            zero_init_last=zero_init_last, act_layer=act_layer, norm_layer=norm_layer,
        )
        self.place(device, dtype)
