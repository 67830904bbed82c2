"""Semantics of the attention blocks beyond the contract: SE, GC, coordinate attention, CBAM, ECA,
SimAM; and the places the attention blocks plug into."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import blockzoo as bz
from blockzoo.core import count_flops

NEW_ATTENTION = ["cbam", "eca", "simam"]


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


# --------------------------------------------------------------------------- CBAM


def _randomise(module: nn.Module) -> None:
    """Non-trivial values for every parameter and BN running statistic (float64 references)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def cbam_reference(x: torch.Tensor, cbam: bz.CBAM, pooled_order=("max", "mean")) -> torch.Tensor:
    """CBAM from the paper's equations (1)-(3), as the authors' code orders the spatial pooling,
    with BatchNorm in eval mode written out."""
    fc1, fc2 = cbam.mlp[0], cbam.mlp[2]

    def mlp(v: torch.Tensor) -> torch.Tensor:  # W1 (C -> C/r), ReLU, W0 (C/r -> C), with biases
        return torch.relu(v @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias

    f_avg, f_max = x.mean(dim=(2, 3)), x.flatten(2).max(dim=2).values
    m_c = torch.sigmoid(mlp(f_avg) + mlp(f_max))
    xc = x * m_c[:, :, None, None]
    pools = {"max": xc.max(dim=1).values, "mean": xc.mean(dim=1)}
    pooled = torch.stack([pools[k] for k in pooled_order], dim=1)  # (N, 2, H, W)
    conv, bn = cbam.spatial.conv, cbam.spatial.bn
    z = F.conv2d(pooled, conv.weight, padding=3)
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return xc * torch.sigmoid(z)


def test_cbam_matches_the_paper_equations_in_float64() -> None:
    cbam = bz.CBAM(32, reduction=4, dtype=torch.float64).eval()
    _randomise(cbam)
    x = torch.randn(2, 32, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(cbam(x), cbam_reference(x, cbam), rtol=1e-12, atol=1e-12)
    # The reference can tell the pooling order apart: the authors' ChannelPool is [max, mean].
    swapped = cbam_reference(x, cbam, pooled_order=("mean", "max"))
    assert not torch.allclose(cbam(x), swapped, atol=1e-6)
    explained = cbam.explain(x)
    assert explained["channel_gate"].shape == (2, 32)
    assert explained["spatial_map"].shape == (2, 7, 5)
    gated = x * explained["channel_gate"][:, :, None, None]
    torch.testing.assert_close(cbam(x), gated * explained["spatial_map"][:, None])


def test_cbam_layout_follows_the_authors_code() -> None:
    cbam = bz.CBAM(256)
    assert cbam.rd_channels == 16  # C / 16
    assert [type(m) for m in cbam.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert cbam.mlp[0].bias is not None and cbam.mlp[2].bias is not None
    conv, bn = cbam.spatial.conv, cbam.spatial.bn
    assert conv.kernel_size == (7, 7) and conv.padding == (3, 3) and conv.bias is None
    assert (conv.in_channels, conv.out_channels) == (2, 1)
    assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-5 and bn.momentum == 0.01
    assert isinstance(cbam.spatial.act, nn.Identity)  # relu=False in the authors' SpatialGate
    mlp = 2 * 256 * 16 + 16 + 256
    assert sum(p.numel() for p in cbam.parameters()) == mlp + 2 * 49 + 2
    assert bz.CBAM(16).rd_channels == 1 and bz.CBAM(64, rd_channels=8).rd_channels == 8


def test_cbam_training_batch_norm_uses_batch_statistics_and_momentum_0_01() -> None:
    cbam = bz.CBAM(16, dtype=torch.float64).train()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
    bn = cbam.spatial.bn
    gated = x * cbam.channel_gate(x)[:, :, None, None]
    pooled = torch.cat([gated.amax(dim=1, keepdim=True), gated.mean(dim=1, keepdim=True)], dim=1)
    z = F.conv2d(pooled, cbam.spatial.conv.weight, padding=3)
    mean, var = z.mean(), z.var(unbiased=False)
    expected = gated * torch.sigmoid((z - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias)
    with torch.no_grad():
        torch.testing.assert_close(cbam(x), expected)
    torch.testing.assert_close(bn.running_mean, 0.01 * mean.detach().reshape(1))
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * z.var(unbiased=True).reshape(1))


def test_cbam_zero_init_spatial_starts_the_spatial_gate_at_one_half() -> None:
    cbam = bz.CBAM(32, zero_init_spatial=True).eval()
    assert torch.count_nonzero(cbam.spatial.bn.weight) == 0
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(cbam.explain(x)["spatial_map"], torch.full((2, 6, 6), 0.5))
    assert torch.count_nonzero(bz.CBAM(32).spatial.bn.weight) == 1


def test_cbam_rejects_bad_options() -> None:
    for bad in ({"reduction": 0}, {"spatial_kernel_size": 4}, {"spatial_kernel_size": 0}):
        with pytest.raises(ValueError, match="CBAM"):
            bz.CBAM(32, **bad)


# --------------------------------------------------------------------------- ECA


def _nearest_odd(t: float) -> int:
    """The odd integer nearest to ``t`` (ties, at even integers, go up), written independently
    of the block's formula."""
    below = 2 * math.floor((t - 1) / 2) + 1  # largest odd <= t
    return below if t - below < below + 2 - t else below + 2


@pytest.mark.parametrize(
    ("channels", "k"), [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (96, 3)]
)
def test_eca_kernel_size_rule(channels: int, k: int) -> None:
    # k = |log2(C) / gamma + b / gamma|_odd with gamma = 2, b = 1
    assert _nearest_odd(math.log2(channels) / 2 + 1 / 2) == k
    assert bz.eca_kernel_size(channels) == k
    eca = bz.EfficientChannelAttention(channels)
    assert eca.kernel_size == k and eca.conv.weight.shape == (1, 1, k)
    assert eca.conv.padding == ((k - 1) // 2,) and eca.conv.bias is None
    assert sum(p.numel() for p in eca.parameters()) == k  # no dimensionality reduction


def test_eca_matches_the_paper_in_float64() -> None:
    eca = bz.EfficientChannelAttention(24, kernel_size=5, dtype=torch.float64)
    torch.nn.init.normal_(eca.conv.weight)
    x = torch.randn(3, 24, 5, 6, dtype=torch.float64)
    y = x.mean(dim=(2, 3))  # global average pooling, (N, C)
    w = eca.conv.weight.flatten()
    # omega_i = sigmoid(sum_j w_j y_{i + j - 2}), zero outside the channels
    logits = torch.zeros_like(y)
    for i in range(24):
        for j in range(5):
            if 0 <= i + j - 2 < 24:
                logits[:, i] += w[j] * y[:, i + j - 2]
    gate = torch.sigmoid(logits)
    torch.testing.assert_close(eca(x), x * gate[:, :, None, None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eca.explain(x)["channel_gate"], gate, rtol=1e-12, atol=1e-12)
    # the same numbers as the module's Conv1d (the authors' layout: conv.weight is (1, 1, k))
    conv_gate = torch.sigmoid(eca.conv(y[:, None, :]))[:, 0]
    torch.testing.assert_close(eca.channel_gate(x), conv_gate, rtol=1e-12, atol=1e-12)


def test_eca_options() -> None:
    assert bz.EfficientChannelAttention(64, kernel_size=9).kernel_size == 9
    assert bz.EfficientChannelAttention(64, gamma=1, b=0).kernel_size == 7  # log2(64) = 6 -> 7
    for bad in ({"kernel_size": 4}, {"kernel_size": 0}, {"gamma": 0}):
        with pytest.raises(ValueError, match="EfficientChannelAttention"):
            bz.EfficientChannelAttention(64, **bad)


# --------------------------------------------------------------------------- SimAM


def simam_reference(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM from the paper's minimal energy (Eqn. 6), e* = 4 (sigma^2 + lambda) /
    ((t - mu)^2 + 2 sigma^2 + 2 lambda), mean and variance over the channel's other M - 1
    neurons' estimate (M = H * W); out = x * sigmoid(1 / e*)."""
    m = x.shape[2] * x.shape[3]
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma2 = ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / (m - 1)
    energy = 4 * (sigma2 + lam) / ((x - mu) ** 2 + 2 * sigma2 + 2 * lam)
    return x * torch.sigmoid(1 / energy)


def test_simam_matches_the_minimal_energy_in_float64() -> None:
    simam = bz.SimAM(16)
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(simam(x), simam_reference(x), rtol=1e-12, atol=1e-12)
    weights = simam.position_weights(x)
    assert weights.shape == x.shape
    torch.testing.assert_close(simam(x), x * weights)
    explained = simam.explain(x)[bz.ExplainKey.POSITION_WEIGHTS]  # averaged over channels
    torch.testing.assert_close(explained, weights.mean(dim=1))
    other = bz.SimAM(16, e_lambda=0.1)
    torch.testing.assert_close(other(x), simam_reference(x, 0.1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(other(x), simam(x))


def test_simam_is_parameter_free_and_defined_on_a_single_position() -> None:
    simam = bz.SimAM(8)
    assert list(simam.parameters()) == [] and list(simam.buffers()) == []
    assert simam.e_lambda == 1e-4
    x = torch.randn(1, 8, 1, 1, requires_grad=True)
    y = simam(x)  # d = 0, so 1 / e* = 0.5 whatever the clamped n
    torch.testing.assert_close(y, x * torch.sigmoid(torch.tensor(0.5)))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="SimAM"):
        bz.SimAM(8, e_lambda=0)


def test_simam_keeps_h_times_w_dynamic_under_tracing_and_float16_on_a_large_map() -> None:
    simam = bz.SimAM(4)
    traced = torch.jit.trace(simam, torch.randn(2, 4, 5, 4))
    for shape in [(1, 4, 9, 3), (3, 4, 1, 1), (2, 4, 16, 16)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(traced(x), simam(x))
    x = torch.randn(1, 4, 260, 260)  # 67,600 positions: a float16 sum of d would overflow
    y = simam(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), simam(x), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- FLOPs


def test_new_attention_blocks_declare_their_elementwise_flops() -> None:
    n, c, h, w = 2, 32, 6, 5
    x = torch.randn(n, c, h, w)
    values = x.numel()
    cbam, eca, simam = bz.CBAM(c), bz.EfficientChannelAttention(c), bz.SimAM(c)
    # 2 FLOPs per multiply-add on the feature map (docs/profiling.md): CBAM's average pool,
    # channel gating, channel mean and spatial gating (max pools are compares, not counted);
    # ECA's pool and gating; SimAM's mean, (x - mu)^2, sum of d, d * a + 0.5 and gating.
    assert cbam.extra_flops(x) == 2 * 4 * values
    assert eca.extra_flops(x) == 2 * 2 * values
    assert simam.extra_flops(x) == 2 * 5 * values
    rd, k = cbam.rd_channels, eca.kernel_size
    mlp = 2 * (2 * n) * (c * rd + rd * c)  # both descriptors through the shared MLP
    spatial = 2 * n * h * w * 2 * 49  # 7x7 conv, 2 -> 1 channels
    assert count_flops(cbam, x) == mlp + spatial + 2 * 4 * values
    assert count_flops(eca, x) == 2 * n * c * k + 2 * 2 * values
    assert count_flops(simam, x) == 2 * 5 * values  # nothing FlopCounterMode sees


# ------------------------------------------------------------------ where attention plugs in


@pytest.mark.parametrize("name", NEW_ATTENTION)
def test_new_attention_in_residual_and_inverted_residual_blocks(name: str) -> None:
    cls = bz.block_info(name).cls
    for block, channels in (
        (bz.create_block("residual", 32, 64, 2, attention=name), 64),
        (bz.create_block("basic_residual", 16, 16, attention=name), 16),
        (bz.create_block("inverted_residual", 24, attention=name), 144),
    ):
        assert isinstance(block.attention, cls) and block.attention.in_channels == channels
        y = block.train()(torch.randn(1, block.in_channels, 1, 1))  # batch 1, 1x1, training
        assert torch.isfinite(y).all()
    model = bz.create_model("resnet_cifar", num_classes=10, attention=name)
    assert sum(isinstance(m, cls) for m in model.modules()) == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NEW_ATTENTION)
def test_new_attention_through_surgery_insert_after(name: str) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = bz.insert_after(model, name, where=lambda n, m: n.endswith("bn2"))
    assert len(report.names) == 8
    assert sum(isinstance(m, bz.block_info(name).cls) for m in model.modules()) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # inserted as a gated residual (gamma 0)


def test_new_attention_listed_by_kind_and_compared() -> None:
    assert set(NEW_ATTENTION) <= set(bz.list_blocks("attention"))
    rows = bz.compare(NEW_ATTENTION, in_channels=16, input_size=(8, 8), batch=1, repeat=1,
                      warmup=0)
    by_name = {r["block"]: r for r in rows}
    assert set(NEW_ATTENTION) <= set(by_name) and "baseline: identity" in by_name
    assert by_name["simam"]["params"] == 0 and by_name["eca"]["params"] == 3
    assert by_name["simam"]["mflops"] > 0  # declared through extra_flops


# --------------------------------------------------------------------------- networks

RESNET50 = 25_557_032  # torchvision's resnet50
STAGES = ((256, 3), (512, 4), (1024, 6), (2048, 3))  # ResNet-50: (outputs, blocks) per stage


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_cbam_resnet50_counts_28_09m_as_the_cbam_paper() -> None:
    model = bz.create_model("cbam_resnet50")
    cbams = [m for m in model.modules() if isinstance(m, bz.CBAM)]
    assert [c.in_channels for c in cbams] == [c for c, n in STAGES for _ in range(n)]
    # per block: shared MLP C -> C/16 -> C with biases, 7x7x2 conv, BN weight and bias
    extra = sum(n * (2 * c * (c // 16) + c // 16 + c + 98 + 2) for c, n in STAGES)
    assert _n_params(model) == RESNET50 + extra == 28_089_624
    assert _n_params(model) / 1e6 == pytest.approx(28.09, rel=0.01)
    assert model.default_cfg["paper_params_m"] == 28.09
    assert all(torch.count_nonzero(c.spatial.bn.weight) == 0 for c in cbams)
    block = model.stages[0][0]
    assert block.attention is cbams[0]  # after the last BN, before the add (ResidualBlock)


def test_eca_resnet50_counts_as_the_eca_paper_in_binary_millions() -> None:
    model = bz.create_model("eca_resnet50")
    ecas = [m for m in model.modules() if isinstance(m, bz.EfficientChannelAttention)]
    kernels = [e.kernel_size for e in ecas]
    assert kernels == [5] * 3 + [5] * 4 + [5] * 6 + [7] * 3  # the adaptive rule per stage
    count = _n_params(model)
    assert count == RESNET50 + sum(kernels) == 25_557_118
    # The ECA paper's 24.37M is this count in units of 1024^2 (its paras_flops.py clever_format)
    assert f"{count / 2**20:.2f}" == "24.37"
    assert count / 1e6 == pytest.approx(model.default_cfg["paper_params_m"], rel=0.01)
    assert model.default_cfg["paper_params_m"] == pytest.approx(24.37 * 2**20 / 1e6, abs=0.01)
