"""SPD-Conv semantics: space-to-depth is a lossless rearrangement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blockzoo as bz
from blockzoo.blocks.spd import space_to_depth


def test_space_to_depth_is_pixel_unshuffle_up_to_a_fixed_channel_permutation() -> None:
    c = 3
    x = torch.randn(2, c, 8, 6)
    ours = space_to_depth(x, 2)
    reference = F.pixel_unshuffle(x, 2)  # channel c * 4 + (i * 2 + j) holds x[c, i::2, j::2]
    perm = [ch * 4 + i * 2 + j for j in range(2) for i in range(2) for ch in range(c)]
    torch.testing.assert_close(ours, reference[:, perm], rtol=0, atol=0)


def test_space_to_depth_reference_order() -> None:
    x = torch.randn(1, 2, 4, 4)
    expected = torch.cat(
        [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1
    )
    torch.testing.assert_close(space_to_depth(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("h", "w", "scale"), [(7, 5, 2), (1, 1, 2), (6, 9, 3)])
def test_space_to_depth_loses_no_value(h: int, w: int, scale: int) -> None:
    x = torch.rand(2, 3, h, w) + 1.0  # strictly positive, so padding zeros are recognisable
    y = space_to_depth(x, scale)
    assert y.shape == (2, 3 * scale * scale, -(-h // scale), -(-w // scale))
    kept = y[y != 0]
    assert kept.numel() == x.numel()
    torch.testing.assert_close(kept.sort().values, x.flatten().sort().values, rtol=0, atol=0)


def test_spd_conv_structure_and_options() -> None:
    block = bz.SPDConv(16, 32)
    assert block.stride == 2
    assert block.conv.conv.in_channels == 64 and block.conv.conv.kernel_size == (3, 3)
    assert block.conv.conv.stride == (1, 1)
    assert isinstance(block.conv.bn, torch.nn.BatchNorm2d)
    assert isinstance(block.conv.act, torch.nn.SiLU)
    point = bz.SPDConv(16, 32, kernel_size=1, act_layer=None)
    assert point.conv.conv.kernel_size == (1, 1)
    assert isinstance(point.conv.act, torch.nn.Identity)
    x = torch.randn(1, 16, 7, 7)
    assert point(x).shape == (1, 32, 4, 4)


def test_spd_conv_equals_conv_on_space_to_depth() -> None:
    block = bz.SPDConv(4, 8).eval()
    x = torch.randn(2, 4, 6, 6)
    conv = block.conv
    expected = conv.act(conv.bn(F.conv2d(space_to_depth(x), conv.conv.weight, padding=1)))
    torch.testing.assert_close(block(x), expected)


def test_spd_conv_stride_is_its_scale_and_must_not_be_one() -> None:
    with pytest.raises(ValueError, match="SPDConv.*scale"):
        bz.SPDConv(16, stride=1)
    assert bz.create_block("spd_conv", 16).stride == 2
    with pytest.raises(ValueError, match="SPDConv"):
        bz.create_block("spd_conv", 16, stride=1)
