"""SPD-Conv: space-to-depth followed by a non-strided convolution.

No More Strided Convolutions or Pooling: A New CNN Building Block for Low-Resolution Images and
Small Objects, Sunkara & Luo, ECML PKDD 2022, arXiv 2208.03641
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import ConvNormAct, LayerSpec
from ..registry import register_block
from .base import Block


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
        self.require(
            kernel_size % 2 == 1, f"kernel_size must be odd (1 or 3), got {kernel_size}"
        )
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
