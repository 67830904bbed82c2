"""Semantics of the depthwise separable convolution beyond the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockzoo as bz


def test_default_is_depthwise_then_pointwise_with_nothing_between() -> None:
    block = bz.SeparableConv(32, 64)
    assert block.dw.conv.groups == 32 and block.dw.conv.kernel_size == (3, 3)
    assert block.dw.conv.bias is None and block.pw.conv.bias is None
    assert isinstance(block.dw.bn, nn.Identity) and isinstance(block.dw.act, nn.Identity)
    assert isinstance(block.pw.bn, nn.BatchNorm2d) and isinstance(block.pw.act, nn.ReLU)
    # 3x3 depthwise 9*32, pointwise 32*64, BatchNorm 2*64
    assert sum(p.numel() for p in block.parameters()) == 9 * 32 + 32 * 64 + 2 * 64 == 2464


def test_parameter_counts_of_the_options() -> None:
    def count(block: nn.Module) -> int:
        return sum(p.numel() for p in block.parameters())

    # depth multiplier 2: 5x5 depthwise 25*16*2, pointwise 32*24, BN 2*24, mid BN 2*32
    block = bz.SeparableConv(16, 24, kernel_size=5, depth_multiplier=2, mid_norm_layer="bn")
    assert count(block) == 25 * 16 * 2 + 32 * 24 + 2 * 24 + 2 * 32 == 1680
    # no norm: the pointwise conv gets a bias (one bias, as Keras' SeparableConv2D)
    plain = bz.SeparableConv(16, 24, norm_layer=None, act_layer=None)
    assert plain.pw.conv.bias is not None and plain.dw.conv.bias is None
    assert count(plain) == 9 * 16 + 16 * 24 + 24


@pytest.mark.parametrize(("stride", "dilation", "kernel_size"), [(1, 1, 3), (2, 2, 3), (2, 1, 5)])
def test_matches_the_two_convolutions_written_out(stride: int, dilation: int,
                                                  kernel_size: int) -> None:
    block = bz.SeparableConv(
        8, 12, stride, kernel_size=kernel_size, dilation=dilation,
        mid_norm_layer="batchnorm", mid_act_layer="relu6", dtype=torch.float64,
    ).eval()
    for bn in (block.dw.bn, block.pw.bn):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    x = torch.randn(2, 8, 9, 6, dtype=torch.float64)
    pad = dilation * (kernel_size - 1) // 2

    def bn(t: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        scale = m.weight / torch.sqrt(m.running_var + m.eps)
        return (t - m.running_mean.reshape(shape)) * scale.reshape(shape) + m.bias.reshape(shape)

    y = F.conv2d(x, block.dw.conv.weight, None, stride, pad, dilation, groups=8)
    y = F.relu6(bn(y, block.dw.bn))
    y = F.relu(bn(F.conv2d(y, block.pw.conv.weight), block.pw.bn))
    assert y.shape == (2, 12, -(-9 // stride), -(-6 // stride))
    torch.testing.assert_close(block(x), y)


def test_equals_a_full_convolution_with_factorised_kernel() -> None:
    """With nothing between, W_full[o, i] = W_pw[o, i] * W_dw[i]: a rank-1-per-pair kernel."""
    block = bz.SeparableConv(6, 10, 2, kernel_size=5, norm_layer=None, act_layer=None,
                             dtype=torch.float64)
    w_dw = block.dw.conv.weight[:, 0]  # (C_in, k, k)
    w_pw = block.pw.conv.weight[:, :, 0, 0]  # (C_out, C_in)
    full = w_pw[:, :, None, None] * w_dw[None]
    x = torch.randn(3, 6, 11, 8, dtype=torch.float64)
    expected = F.conv2d(x, full, block.pw.conv.bias, stride=2, padding=2)
    torch.testing.assert_close(block(x), expected)


def test_rejects_bad_options() -> None:
    for bad in ({"kernel_size": 4}, {"kernel_size": 0}, {"dilation": 0},
                {"depth_multiplier": 0}, {"depth_multiplier": 1.5}):
        with pytest.raises(ValueError, match="SeparableConv"):
            bz.SeparableConv(16, **bad)
