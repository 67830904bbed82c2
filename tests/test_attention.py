"""Semantics of the attention blocks beyond the contract: SE, GC, coordinate attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blockzoo as bz


@pytest.mark.parametrize(("channels", "reduced"), [(64, 8), (256, 16), (2048, 128), (16, 8)])
def test_se_reduction_is_c_over_16_with_at_least_8_channels(channels: int, reduced: int) -> None:
    se = bz.SqueezeExcite(channels)
    assert se.fc1.out_channels == reduced and se.fc2.in_channels == reduced
    assert sum(p.numel() for p in se.parameters()) == 2 * channels * reduced + channels + reduced


def test_se_matches_the_paper_formula() -> None:
    se = bz.SqueezeExcite(32, reduction=4)
    x = torch.randn(2, 32, 5, 7)
    z = x.mean(dim=(2, 3))
    s = torch.sigmoid(F.linear(F.relu(F.linear(z, se.fc1.weight[:, :, 0, 0], se.fc1.bias)),
                               se.fc2.weight[:, :, 0, 0], se.fc2.bias))
    torch.testing.assert_close(se(x), x * s[:, :, None, None])
    assert se.explain(x)["channel_gate"].shape == (2, 32)


def test_fresh_global_context_block_is_the_identity() -> None:
    gc = bz.GlobalContext(64)
    x = torch.randn(2, 64, 9, 5)
    torch.testing.assert_close(gc(x), x, rtol=0, atol=0)
    assert gc.planes == 4
    assert isinstance(gc.channel_add[1], torch.nn.LayerNorm)
    assert gc.channel_add[1].normalized_shape == (4, 1, 1)


def test_global_context_softmax_over_all_positions_and_formula() -> None:
    gc = bz.GlobalContext(32, fusion_types=("channel_add", "channel_mul"))
    for transform in (gc.channel_add, gc.channel_mul):
        torch.nn.init.normal_(transform[-1].weight)
    x = torch.randn(3, 32, 6, 4)
    mask = gc.explain(x)["context_mask"]
    assert mask.shape == (3, 6, 4)
    torch.testing.assert_close(mask.sum(dim=(1, 2)), torch.ones(3))
    logits = F.conv2d(x, gc.conv_mask.weight, gc.conv_mask.bias).flatten(2)
    weights = logits.softmax(dim=-1)  # over the H*W positions
    context = torch.einsum("ncp,nop->nc", x.flatten(2), weights)[:, :, None, None]
    expected = x * torch.sigmoid(gc.channel_mul(context)) + gc.channel_add(context)
    torch.testing.assert_close(gc(x), expected)


def test_global_context_options() -> None:
    x = torch.randn(2, 32, 5, 5)
    fresh_mul = bz.GlobalContext(32, fusion_types=("channel_mul",))
    torch.testing.assert_close(fresh_mul(x), 0.5 * x)  # zero-initialised last conv, sigmoid(0)
    avg = bz.GlobalContext(32, pool="avg")
    assert avg.conv_mask is None
    torch.nn.init.normal_(avg.channel_add[-1].weight)
    torch.testing.assert_close(avg(x), x + avg.channel_add(x.mean(dim=(2, 3), keepdim=True)))
    for bad in ({"pool": "max"}, {"fusion_types": ()}, {"fusion_types": ("add",)}):
        with pytest.raises(ValueError, match="GlobalContext"):
            bz.GlobalContext(32, **bad)


@pytest.mark.parametrize(("channels", "mip"), [(16, 8), (64, 8), (512, 16), (1024, 32)])
def test_coordinate_attention_mip(channels: int, mip: int) -> None:
    assert bz.CoordinateAttention(channels).mip == mip


def test_coordinate_attention_matches_the_paper_formula() -> None:
    ca = bz.CoordinateAttention(32).eval()
    x = torch.randn(2, 32, 5, 7)
    z_h = x.mean(dim=3)  # (N, C, H)
    z_w = x.mean(dim=2)  # (N, C, W)
    f = torch.cat([z_h, z_w], dim=2)[..., None]
    f = ca.act(ca.bn1(ca.conv1(f)))
    a_h = torch.sigmoid(ca.conv_h(f[:, :, :5]))  # (N, C, H, 1)
    a_w = torch.sigmoid(ca.conv_w(f[:, :, 5:])).transpose(2, 3)  # (N, C, 1, W)
    torch.testing.assert_close(ca(x), x * a_h * a_w)
    assert isinstance(ca.bn1, torch.nn.BatchNorm2d)
    assert ca.explain(x)["attention_map"].shape == (2, 5, 7)


def test_attention_blocks_reject_width_or_stride_change() -> None:
    for name in bz.list_blocks("attention"):
        with pytest.raises(ValueError, match="out_channels"):
            bz.create_block(name, 32, 64)
        with pytest.raises(ValueError, match="stride"):
            bz.create_block(name, 32, stride=2)
