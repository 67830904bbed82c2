"""The Inception module of GoogLeNet, naive and with dimension reductions.

Going Deeper with Convolutions, Szegedy et al., CVPR 2015, arXiv 1409.4842
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.validation import check_bool, check_positive_int
from ..layers import ConvNormAct, LayerSpec, make_divisible
from ..registry import register_block
from .base import Block

#: inception(3a) of the paper's Table 1, the reference for the default widths: 192 input
#: channels -> 1x1: 64 | 3x3 reduce: 96, 3x3: 128 | 5x5 reduce: 16, 5x5: 32 | pool proj: 32.
INCEPTION_3A = {
    "ch1x1": 64, "ch3x3red": 96, "ch3x3": 128, "ch5x5red": 16, "ch5x5": 32, "pool_proj": 32,
}
_REDUCTIONS = ("ch3x3red", "ch5x5red", "pool_proj")
_INCEPTION = dict(
    paper="Going Deeper with Convolutions",
    arxiv="1409.4842",
    year=2015,
    kind="block",
)


@register_block(
    "inception_naive",
    summary="Naive Inception: parallel 1x1, 3x3, 5x5 convs and 3x3 max-pool, concatenated.",
    preset={"naive": True},
    **_INCEPTION,
)
@register_block(
    "inception",
    summary="GoogLeNet's Inception: 1x1 | 1x1-3x3 | 1x1-5x5 | pool-1x1 branches, concatenated.",
    **_INCEPTION,
)
class Inception(Block):
    """Inception module (Szegedy et al., GoogLeNet, arXiv 1409.4842, Fig. 2).

    Four parallel branches over the same input, concatenated along channels (in this order):

    - ``branch1``: 1x1 conv -> ``ch1x1``
    - ``branch2``: 1x1 conv -> ``ch3x3red``, 3x3 conv -> ``ch3x3``
    - ``branch3``: 1x1 conv -> ``ch5x5red``, 5x5 conv -> ``ch5x5``
    - ``branch4``: 3x3 max-pool (stride 1, padding 1), 1x1 conv -> ``pool_proj``

    ``naive=True`` (registered as ``inception_naive``, Fig. 2a) drops the three 1x1 reductions:
    the 3x3 and 5x5 convs see the input directly and the pool branch passes its
    ``in_channels`` through. Every conv is followed by BatchNorm and ReLU: the paper predates
    BatchNorm; like torchvision's GoogLeNet we add it (and drop the conv bias). Unlike
    torchvision, the 5x5 branch really is 5x5.

    ``out_channels`` is structural: ``ch1x1 + ch3x3 + ch5x5 + pool_proj`` (naive:
    ``ch1x1 + ch3x3 + ch5x5 + in_channels``); passing another value is a ``ValueError``.
    The paper's inception(3a), ``Inception(192, ch1x1=64, ch3x3red=96, ch3x3=128,
    ch5x5red=16, ch5x5=32, pool_proj=32)``, gives 64 + 128 + 32 + 32 = 256 channels. A width
    left ``None`` is inception(3a)'s scaled by ``in_channels / 192`` and rounded by
    ``make_divisible(., 8)``, so that ``Inception(192)`` is exactly inception(3a) and
    ``Inception(64)`` has widths 24 | 32-40 | 8-16 | 16 (96 channels out).

    Shapes: ``(N, C_in, H, W) -> (N, out_channels, H, W)``.
    """

    allowed_strides = (1,)
    stride_reason = "keeps the spatial size"
    width = "structural"

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        ch1x1: int | None = None,
        ch3x3red: int | None = None,
        ch3x3: int | None = None,
        ch5x5red: int | None = None,
        ch5x5: int | None = None,
        pool_proj: int | None = None,
        naive: bool = False,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_bool(name, "naive", naive)
        self.check_layers(norm_layer=norm_layer, act_layer=act_layer)
        given = {
            "ch1x1": ch1x1, "ch3x3red": ch3x3red, "ch3x3": ch3x3,
            "ch5x5red": ch5x5red, "ch5x5": ch5x5, "pool_proj": pool_proj,
        }
        if naive:
            extra = [k for k in _REDUCTIONS if given[k] is not None]
            self.require(not extra, f"the naive module has no reductions, got {extra}")
        widths = {
            key: check_positive_int(name, key, value) if value is not None
            else make_divisible(in_channels * INCEPTION_3A[key] / 192, 8)
            for key, value in given.items()
            if not (naive and key in _REDUCTIONS)
        }
        self.naive = naive
        self.widths = widths
        pool_out = in_channels if naive else widths["pool_proj"]
        derived = widths["ch1x1"] + widths["ch3x3"] + widths["ch5x5"] + pool_out
        rule = "ch1x1 + ch3x3 + ch5x5 + " + ("in_channels" if naive else "pool_proj")
        self.derive_out_channels(out_channels, derived, rule)

        def conv(c_in: int, c_out: int, k: int) -> ConvNormAct:
            return ConvNormAct(c_in, c_out, k, norm_layer=norm_layer, act_layer=act_layer)

        def reduce_then(k: int, reduce: str | None, out: str) -> nn.Sequential:
            if reduce is None:
                return nn.Sequential(conv(in_channels, widths[out], k))
            return nn.Sequential(
                conv(in_channels, widths[reduce], 1), conv(widths[reduce], widths[out], k)
            )

        self.branch1 = conv(in_channels, widths["ch1x1"], 1)
        self.branch2 = reduce_then(3, None if naive else "ch3x3red", "ch3x3")
        self.branch3 = reduce_then(5, None if naive else "ch5x5red", "ch5x5")
        pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.branch4 = (
            nn.Sequential(pool) if naive
            else nn.Sequential(pool, conv(in_channels, widths["pool_proj"], 1))
        )
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
