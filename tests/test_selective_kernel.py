"""Selective Kernel semantics: branches, softmax over branches, z at batch 1, the SKNet unit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blockzoo as bz
from blockzoo.blocks.selective_kernel import clamp_groups


def _randomise_attention(sk: bz.SKConv) -> None:
    """Make the branch weights far from uniform, so that mixing mistakes are visible."""
    torch.nn.init.normal_(sk.fc.conv.weight, std=0.5)
    torch.nn.init.normal_(sk.select.weight, std=1.0)


def _reference(sk: bz.SKConv, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's SKConv written from the module's weights (eval mode)."""
    features = []
    for branch in sk.branches:
        conv = branch.conv
        u = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        features.append(F.relu(branch.bn(u)))
    s = sum(features).mean(dim=(2, 3))  # (N, C)
    z = F.relu(sk.fc.bn(F.linear(s, sk.fc.conv.weight[:, :, 0, 0])[:, :, None, None]))
    logits = F.linear(z[:, :, 0, 0], sk.select.weight[:, :, 0, 0])  # (N, M*C), branch-major
    a = logits.reshape(x.shape[0], sk.M, sk.out_channels).softmax(dim=1)
    out = sum(a[:, m, :, None, None] * features[m] for m in range(sk.M))
    return out, a


@pytest.mark.parametrize(("groups", "channels", "expected"), [
    (32, (64,), 32), (32, (16,), 16), (32, (48,), 24), (32, (16, 24), 8), (32, (64, 128), 32),
    (4, (6,), 3), (1, (64,), 1),
])
def test_clamp_groups_takes_the_largest_common_divisor_not_above_groups(
    groups: int, channels: tuple[int, ...], expected: int
) -> None:
    assert clamp_groups(groups, *channels) == expected


def test_sk_conv_defaults_match_the_paper() -> None:
    sk = bz.SKConv(64)
    assert (sk.M, sk.groups, sk.d) == (2, 32, 32)
    for m, branch in enumerate(sk.branches, start=1):
        conv = branch.conv
        assert conv.kernel_size == (3, 3) and conv.dilation == (m, m) and conv.padding == (m, m)
        assert conv.groups == 32 and conv.bias is None
        assert isinstance(branch.bn, torch.nn.BatchNorm2d)
        assert isinstance(branch.act, torch.nn.ReLU)
    assert sk.fc.conv.bias is None and isinstance(sk.fc.bn, torch.nn.BatchNorm2d)
    assert isinstance(sk.fc.act, torch.nn.ReLU)
    assert sk.select.out_channels == 2 * 64 and sk.select.bias is None
    assert float(sk.select.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    # d = max(C / r, L): C / 16 wins from 512 channels on
    assert bz.SKConv(256).d == 32 and bz.SKConv(1024).d == 64


def test_sk_conv_parameter_count_by_hand() -> None:
    # branches: 2 x (64 * 64 / 32 * 9 conv + 2 * 64 BN); z: 64 * 32 + 2 * 32; select: 32 * 128
    expected = 2 * (64 * 2 * 9 + 128) + (64 * 32 + 64) + 32 * 128
    assert expected == 8768
    assert sum(p.numel() for p in bz.SKConv(64).parameters()) == expected


@pytest.mark.parametrize("stride", [1, 2])
def test_sk_conv_matches_the_paper_formula(stride: int) -> None:
    sk = bz.SKConv(16, 24, stride, groups=4, min_dim=8).eval()
    _randomise_attention(sk)
    x = torch.randn(3, 16, 9, 7)
    out, weights = sk(x, return_attention=True)
    expected_out, expected_weights = _reference(sk, x)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected_out)
    assert out.shape == (3, 24, -(-9 // stride), -(-7 // stride))
    torch.testing.assert_close(sk.explain(x)["branch_weights"], weights)


def test_sk_attention_sums_to_one_per_channel_over_branches() -> None:
    sk = bz.SKConv(32, M=3, groups=8, min_dim=8).eval()
    _randomise_attention(sk)
    weights = sk.explain(torch.randn(4, 32, 6, 6))["branch_weights"]
    assert weights.shape == (4, 3, 32)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4, 32))
    assert weights.min() >= 0
    assert (weights.amax(dim=1) - weights.amin(dim=1)).max() > 0.1  # not trivially uniform


@pytest.mark.parametrize("kernel_sizes", [None, (3, 3)])
def test_sk_conv_equal_branch_features_give_that_feature(kernel_sizes) -> None:
    """If every U_m is the same F, then sum_m a_m F = F for any attention."""
    sk = bz.SKConv(16, groups=4, min_dim=8, kernel_sizes=kernel_sizes).eval()
    _randomise_attention(sk)
    first = sk.branches[0]
    with torch.no_grad():
        if kernel_sizes is None:  # dilation 1 vs 2: keep the centre tap only, then it is moot
            centre = torch.zeros_like(first.conv.weight)
            centre[:, :, 1, 1] = first.conv.weight[:, :, 1, 1]
            first.conv.weight.copy_(centre)
        for branch in sk.branches[1:]:
            branch.load_state_dict(first.state_dict())
    x = torch.randn(2, 16, 7, 5)
    feature = first(x)
    torch.testing.assert_close(sk.branches[1](x), feature)
    out, weights = sk(x, return_attention=True)
    assert (weights - 0.5).abs().max() > 0.05
    torch.testing.assert_close(out, feature)


def test_sk_conv_kernel_sizes_give_real_larger_kernels() -> None:
    sk = bz.SKConv(16, 32, 2, kernel_sizes=(3, 5, 7), groups=8)
    assert sk.M == 3
    for k, branch in zip((3, 5, 7), sk.branches, strict=True):
        conv = branch.conv
        assert conv.kernel_size == (k, k) and conv.dilation == (1, 1)
        assert conv.padding == ((k - 1) // 2,) * 2 and conv.stride == (2, 2)
    assert sk(torch.randn(1, 16, 9, 5)).shape == (1, 32, 5, 3)
    assert bz.SKConv(16, M=3).M == 3
    assert [b.conv.dilation for b in bz.SKConv(16, M=3).branches] == [(1, 1), (2, 2), (3, 3)]


def test_sk_conv_z_batchnorm_at_batch_one_uses_running_statistics() -> None:
    """At N = 1 in training, z (one value per channel) is normalised with the running
    statistics, which stay untouched; the branch BNs still use the batch statistics."""
    sk = bz.SKConv(16, groups=4, min_dim=8).train()
    _randomise_attention(sk)
    with torch.no_grad():
        sk.fc.bn.running_mean.normal_()
        sk.fc.bn.running_var.uniform_(0.5, 2.0)
    z_stats = (sk.fc.bn.running_mean.clone(), sk.fc.bn.running_var.clone())
    branch_mean = sk.branches[0].bn.running_mean.clone()
    x = torch.randn(1, 16, 6, 5, requires_grad=True)
    out, weights = sk(x, return_attention=True)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close((sk.fc.bn.running_mean, sk.fc.bn.running_var), z_stats)
    assert not torch.equal(sk.branches[0].bn.running_mean, branch_mean)
    # the same forward with only the z BN switched to eval mode gives the same attention
    sk.fc.bn.eval()
    with torch.no_grad():
        _, eval_z_weights = sk(x, return_attention=True)
    torch.testing.assert_close(weights, eval_z_weights)


def test_sk_conv_z_batchnorm_uses_batch_statistics_for_larger_batches() -> None:
    sk = bz.SKConv(16, groups=4, min_dim=8).train()
    before = sk.fc.bn.running_mean.clone()
    sk(torch.randn(4, 16, 6, 5))
    assert not torch.equal(sk.fc.bn.running_mean, before)


def test_sk_conv_rejects_bad_arguments() -> None:
    for kwargs in ({"kernel_sizes": (3, 4)}, {"kernel_sizes": ()}, {"M": 0},
                   {"M": 3, "kernel_sizes": (3, 5)}, {"groups": 0}, {"reduction": 0},
                   {"min_dim": 0}, {"stride": 3}):
        with pytest.raises(ValueError, match="SKConv"):
            bz.SKConv(16, **kwargs)


def test_sk_unit_structure() -> None:
    unit = bz.SKUnit(64, 256)
    assert unit.mid_channels == 128
    assert unit.conv1.conv.out_channels == 128 and isinstance(unit.conv1.act, torch.nn.ReLU)
    assert (unit.sk.in_channels, unit.sk.out_channels, unit.sk.groups, unit.sk.d) == (
        128, 128, 32, 32
    )
    assert unit.conv3.conv.out_channels == 256
    assert isinstance(unit.conv3.act, torch.nn.Identity)  # ReLU only after the addition
    assert isinstance(unit.conv3.bn, torch.nn.BatchNorm2d)
    assert unit.shortcut.conv.kernel_size == (1, 1) and unit.shortcut.conv.stride == (1, 1)
    assert isinstance(unit.shortcut.bn, torch.nn.BatchNorm2d)
    assert isinstance(bz.SKUnit(64).shortcut, torch.nn.Identity)
    down = bz.SKUnit(64, 64, 2)
    assert down.shortcut.conv.stride == (2, 2)  # shape changes: strided 1x1 projection
    assert all(b.conv.stride == (2, 2) for b in down.sk.branches)  # the SKConv carries it
    assert down.conv1.conv.stride == (1, 1) and down.conv3.conv.stride == (1, 1)
    assert bz.SKUnit(16, 32, mid_channels=8).sk.out_channels == 8


@pytest.mark.parametrize(("in_channels", "out_channels", "stride"), [(32, 32, 1), (16, 32, 2)])
def test_sk_unit_is_the_residual_formula(in_channels: int, out_channels: int, stride: int) -> None:
    unit = bz.SKUnit(in_channels, out_channels, stride, groups=4, min_dim=8).eval()
    _randomise_attention(unit.sk)
    x = torch.randn(2, in_channels, 9, 6)
    branch = unit.conv3(unit.sk(unit.conv1(x)))
    shortcut = x if stride == 1 and in_channels == out_channels else unit.shortcut(x)
    torch.testing.assert_close(unit(x), F.relu(branch + shortcut))
    weights = unit.explain(x)["branch_weights"]
    assert weights.shape == (2, 2, out_channels // 2)
    torch.testing.assert_close(weights, unit.sk.explain(unit.conv1(x))["branch_weights"])


def test_sk_unit_rejects_bad_arguments() -> None:
    for kwargs in ({"mid_channels": 0}, {"stride": 3}, {"kernel_sizes": (2,)}):
        with pytest.raises(ValueError, match="SK"):
            bz.SKUnit(16, **kwargs)
