"""Semantics of the Inception module (GoogLeNet) beyond the contract."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockzoo as bz
from blockzoo.blocks.inception import INCEPTION_3A


def _count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def test_inception_3a_widths_and_parameter_count() -> None:
    block = bz.Inception(192, **INCEPTION_3A)
    assert block.out_channels == 64 + 128 + 32 + 32 == 256
    # every conv without bias, followed by BatchNorm (2 parameters per channel)
    by_hand = (
        192 * 64 + 2 * 64  # 1x1
        + 192 * 96 + 2 * 96 + 9 * 96 * 128 + 2 * 128  # 1x1 reduce -> 3x3
        + 192 * 16 + 2 * 16 + 25 * 16 * 32 + 2 * 32  # 1x1 reduce -> 5x5
        + 192 * 32 + 2 * 32  # pool projection
    )
    assert _count(block) == by_hand == 164_064
    # the defaults at 192 input channels are inception(3a)
    assert bz.Inception(192).widths == INCEPTION_3A
    assert _count(bz.create_block("inception", 192)) == by_hand


def test_default_widths_scale_inception_3a() -> None:
    block = bz.Inception(64)
    assert block.widths == {
        "ch1x1": 24, "ch3x3red": 32, "ch3x3": 40, "ch5x5red": 8, "ch5x5": 16, "pool_proj": 16,
    }
    assert block.out_channels == 96
    assert block.branch3[1].conv.kernel_size == (5, 5)  # a real 5x5, unlike torchvision


def test_branches_are_concatenated_in_order() -> None:
    block = bz.Inception(16, ch1x1=3, ch3x3red=4, ch3x3=5, ch5x5red=2, ch5x5=6, pool_proj=7).eval()
    x = torch.randn(2, 16, 7, 9)
    y = block(x)
    assert y.shape == (2, 3 + 5 + 6 + 7, 7, 9)
    parts = y.split([3, 5, 6, 7], dim=1)
    for part, branch in zip(parts, (block.branch1, block.branch2, block.branch3, block.branch4),
                            strict=True):
        torch.testing.assert_close(part, branch(x), rtol=0, atol=0)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1)
    torch.testing.assert_close(parts[3], block.branch4[1](pooled), rtol=0, atol=0)


def test_matches_torchvision_googlenet_inception_with_a_5x5_branch() -> None:
    googlenet = importlib.import_module("torchvision.models.googlenet")
    reference = googlenet.Inception(24, 8, 12, 16, 4, 8, 8)
    # torchvision's "5x5" branch is a 3x3 conv (kept for its weights); make it the paper's 5x5
    reference.branch3[1] = googlenet.BasicConv2d(4, 8, kernel_size=5, padding=2)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    ours = bz.Inception(24, ch1x1=8, ch3x3red=12, ch3x3=16, ch5x5red=4, ch5x5=8, pool_proj=8,
                        norm_layer=partial(bz.layers.BatchNorm2d, eps=1e-3))
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 24, 9, 10)
    torch.testing.assert_close(ours.train()(x), reference.train()(x))  # batch statistics
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(ours.get_buffer(name), buffer)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_naive_module() -> None:
    block = bz.create_block("inception_naive", 32, ch1x1=8, ch3x3=16, ch5x5=8).eval()
    assert block.naive and block.out_channels == 8 + 16 + 8 + 32
    # 1x1, 3x3 and 5x5 convs straight on the input, each with BatchNorm; the pool has no weights
    assert _count(block) == (32 * 8 + 16) + (9 * 32 * 16 + 32) + (25 * 32 * 8 + 16) == 11_328
    x = torch.randn(2, 32, 6, 5)
    y = block(x)
    torch.testing.assert_close(y[:, 32:], F.max_pool2d(x, 3, stride=1, padding=1))
    torch.testing.assert_close(y[:, 8:24], block.branch2(x))
    assert bz.create_block("inception_naive", 64).out_channels == 24 + 40 + 16 + 64


def test_structural_out_channels_and_bad_widths() -> None:
    with pytest.raises(ValueError, match=r"Inception.*ch1x1 \+ ch3x3 \+ ch5x5 \+ pool_proj = 96"):
        bz.Inception(64, 128)
    assert bz.Inception(64, 96).out_channels == 96
    with pytest.raises(ValueError, match=r"Inception.*\+ in_channels = 144"):
        bz.Inception(64, 96, naive=True)
    with pytest.raises(ValueError, match="Inception.*no reductions"):
        bz.Inception(64, naive=True, pool_proj=8)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="Inception.*ch3x3"):
            bz.Inception(64, ch3x3=bad)
