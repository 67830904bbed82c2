"""Selective Kernel convolution and the SKNet bottleneck unit.

Selective Kernel Networks, Li et al., CVPR 2019, arXiv 1903.06586

Details follow the authors' Caffe model (``implus/SKNet``, ``sknet50.prototxt``): every branch is
a grouped 3x3 conv (dilation ``m`` for branch ``m``) + BN + ReLU with the stride; the fuse step is
global average pooling -> 1x1 conv (no bias) + BN + ReLU -> 1x1 conv (no bias) to ``M * C``
channels, reshaped branch-major to ``(N, M, C)`` and soft-maxed over the branch axis; both 1x1
convs start from a Gaussian with std 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..core.counting import map_elements
from ..core.validation import check_positive_int, check_positive_number
from ..layers import ConvNormAct, LayerSpec, create_act
from ..registry import register_block
from .base import Block, ExplainKey
from .residual import residual_shortcut


def clamp_groups(groups: int, *channels: int) -> int:
    """The largest divisor of every value in ``channels`` that is at most ``groups``.

    ``clamp_groups(32, 64)`` is 32, ``clamp_groups(32, 16)`` is 16 (depthwise),
    ``clamp_groups(32, 48)`` is 24 and ``clamp_groups(32, 16, 24)`` is 8.
    """
    common = math.gcd(*channels)
    return max(g for g in range(1, min(groups, common) + 1) if common % g == 0)


@register_block(
    "sk_conv",
    kind="conv",
    paper="Selective Kernel Networks",
    arxiv="1903.06586",
    year=2019,
    summary="Parallel branches with different receptive fields, mixed per channel by a softmax "
    "attention computed from their pooled sum.",
    notes="groups are clamped to the largest divisor of in_channels and out_channels not above "
    "the requested value. The BN on the fused vector z uses the running statistics for a "
    "training batch of one (blockzoo BatchNorm2d).",
)
class SKConv(Block):
    """Selective Kernel convolution (Li et al., arXiv 1903.06586).

    Split: ``M`` branches ``U_m = ReLU(BN(conv_m(x)))``, ``conv_m`` a grouped 3x3 conv with
    dilation ``m`` (padding ``m``, ``m = 1..M``) and the block's stride, mapping ``in -> out``
    channels. ``kernel_sizes=(3, 5, ...)`` gives real ``k x k`` kernels (dilation 1) instead, one
    branch per size (``M = len(kernel_sizes)``).
    Fuse: ``U = sum_m U_m``, ``s = mean_hw(U)``, ``z = ReLU(BN(W_z s))`` with ``W_z: C -> d``,
    ``d = max(int(C / reduction), min_dim)``. Select: ``a = softmax_M(reshape(W_a z, (M, C)))``
    with ``W_a: d -> M * C`` (branch-major), ``out = sum_m a_m * U_m``.

    Defaults: ``M = 2``, ``groups = 32``, ``reduction = 16``, ``min_dim = 32``, ReLU, BatchNorm;
    ``W_z`` and ``W_a`` are 1x1 convs without bias. ``groups`` is clamped to the largest divisor of
    both ``in_channels`` and ``out_channels`` that does not exceed it (:func:`clamp_groups`).

    Batch size 1: ``z`` has one value per channel, so in training mode its BatchNorm (blockzoo's
    :class:`~blockzoo.layers.BatchNorm2d`) normalises it with the running statistics, as in eval
    mode, and leaves them untouched; with ``N > 1`` it uses the batch statistics as in the paper.

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / s), ceil(W / s))``, stride 1 or 2. ``forward(x,
    return_attention=True)`` also returns the attention ``a`` of shape ``(N, M, out)``.
    """

    conv_preservation = (
        "its branches end in BatchNorm + ReLU and are mixed by a softmax, a non-linear function "
        "of the input that no initialisation makes equal to a linear convolution"
    )

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        M: int | None = None,
        kernel_sizes: Sequence[int] | None = None,
        groups: int = 32,
        reduction: float = 16,
        min_dim: int = 32,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        if kernel_sizes is None:
            num = check_positive_int(name, "M", 2 if M is None else M)
            specs = [(3, m) for m in range(1, num + 1)]
        else:
            self.require(
                isinstance(kernel_sizes, (tuple, list)) and len(kernel_sizes) > 0,
                f"kernel_sizes must be a non-empty sequence of positive odd integers, got "
                f"{kernel_sizes!r}",
            )
            kernel_sizes = tuple(
                check_positive_int(name, "kernel_sizes", k, odd=True) for k in kernel_sizes
            )
            self.require(
                M in (None, len(kernel_sizes)),
                f"M ({M}) disagrees with kernel_sizes {kernel_sizes}; leave M unset",
            )
            specs = [(k, 1) for k in kernel_sizes]
        check_positive_int(name, "groups", groups)
        check_positive_number(name, "reduction", reduction)
        check_positive_int(name, "min_dim", min_dim)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        out = self.out_channels
        self.M = len(specs)
        self.groups = clamp_groups(groups, in_channels, out)
        self.d = max(int(out / reduction), min_dim)
        self.branches = nn.ModuleList(
            ConvNormAct(
                in_channels, out, k, stride, dilation=dilation, groups=self.groups,
                norm_layer=norm_layer, act_layer=act_layer,
            )
            for k, dilation in specs
        )
        self.fc = ConvNormAct(
            out, self.d, 1, norm_layer=norm_layer, act_layer=act_layer, bias=False
        )
        self.select = nn.Conv2d(self.d, self.M * out, 1, bias=False)
        nn.init.normal_(self.fc.conv.weight, std=0.01)
        nn.init.normal_(self.select.weight, std=0.01)
        self.place(device, dtype)

    def attention(self, fused: torch.Tensor) -> torch.Tensor:
        """Branch weights ``(N, M, C)`` from the fused map ``U``; they sum to 1 over ``M``."""
        z = self.fc(fused.mean(dim=(2, 3), keepdim=True))
        logits = self.select(z).reshape(fused.shape[0], self.M, self.out_channels)
        return logits.softmax(dim=1)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        features = [branch(x) for branch in self.branches]
        weights = self.attention(sum(features))
        out = sum(
            weights[:, m, :, None, None] * feature for m, feature in enumerate(features)
        )
        return (out, weights) if return_attention else out

    def extra_flops(self, x: torch.Tensor) -> int:
        """Per output value: ``M - 1`` adds fuse the branches into ``U``, one for the global
        pool of ``U`` and ``M`` for the weighted sum ``sum_m a_m U_m``: ``2 * 2M * N*C*H'*W'``
        FLOPs (``C = out_channels``)."""
        return 2 * 2 * self.M * map_elements(x, self.out_channels, self.stride)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The branch weights ``a`` of shape ``(N, M, out_channels)`` (softmax over ``M``)."""
        return {ExplainKey.BRANCH_WEIGHTS: self(x, return_attention=True)[1]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, M={self.M}, groups={self.groups}, d={self.d}"


@register_block(
    "sk_unit",
    kind="block",
    paper="Selective Kernel Networks",
    arxiv="1903.06586",
    year=2019,
    summary="SKNet bottleneck: 1x1 conv -> SKConv (stride) -> 1x1 conv, plus a shortcut.",
    notes="mid_channels defaults to out_channels // 2 as in SKNet-50; the SKConv's groups are "
    "clamped to a divisor of mid_channels.",
)
class SKUnit(Block):
    """SKNet bottleneck unit (Li et al., arXiv 1903.06586).

    ``out = ReLU(BN(conv1x1(SKConv(ReLU(BN(conv1x1(x)))))) + shortcut(x))``: a 1x1 conv
    ``in -> mid`` + BN + ReLU, an :class:`SKConv` ``mid -> mid`` carrying the stride, a 1x1 conv
    ``mid -> out`` + BN. The shortcut is the identity when ``in == out`` and ``stride == 1``,
    else a strided 1x1 conv + BN. ``mid_channels`` defaults to ``out // 2`` (at least 1), as in
    SKNet-50 (128 -> 256); the SKConv options (``M``, ``kernel_sizes``, ``groups=32``,
    ``reduction=16``, ``min_dim=32``) pass through.

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / s), ceil(W / s))``, stride 1 or 2.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        mid_channels: int | None = None,
        M: int | None = None,
        kernel_sizes: Sequence[int] | None = None,
        groups: int = 32,
        reduction: float = 16,
        min_dim: int = 32,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        out = self.out_channels
        mid = max(1, out // 2) if mid_channels is None else mid_channels
        check_positive_int(type(self).__name__, "mid_channels", mid)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        self.mid_channels = mid
        self.conv1 = ConvNormAct(in_channels, mid, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.sk = SKConv(
            mid, mid, stride, M=M, kernel_sizes=kernel_sizes, groups=groups,
            reduction=reduction, min_dim=min_dim, act_layer=act_layer, norm_layer=norm_layer,
        )
        self.conv3 = ConvNormAct(mid, out, 1, norm_layer=norm_layer, act_layer=None)
        self.shortcut = residual_shortcut(self, norm_layer)
        self.act = create_act(act_layer, inplace=True)
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.act(self.conv3(self.sk(self.conv1(x))) + self.shortcut(x))

    def extra_flops(self, x: torch.Tensor) -> int:
        """The shortcut add, one per output value (the SKConv inside declares its own)."""
        return 2 * map_elements(x, self.out_channels, self.stride)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The SKConv's branch weights ``(N, M, mid_channels)``."""
        self.check_input(x)
        return self.sk.explain(self.conv1(x))
