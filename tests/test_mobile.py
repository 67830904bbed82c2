"""Semantics of MobileNetV2's inverted residual block beyond the contract.

Faithfulness is checked against torchvision's ``InvertedResidual`` (random weights, no
download) with the weights copied over, and against parameter counts worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import blockzoo as bz

from .test_residual import assert_same_function, n_params


@pytest.fixture(scope="module")
def mobilenet_v2() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None)


@pytest.mark.parametrize(
    ("index", "in_channels", "out_channels", "stride", "t", "params"),
    [
        # t = 1: depthwise 32 * 9 + BN 2 * 32, projection 32 * 16 + BN 2 * 16
        (1, 32, 16, 1, 1, 32 * 9 + 2 * 32 + 32 * 16 + 2 * 16),
        # 16 -> 96 -> 24, stride 2
        (2, 16, 24, 2, 6, 16 * 96 + 2 * 96 + 96 * 9 + 2 * 96 + 96 * 24 + 2 * 24),
        # 24 -> 144 -> 24, stride 1: with the residual connection
        (3, 24, 24, 1, 6, 24 * 144 + 2 * 144 + 144 * 9 + 2 * 144 + 144 * 24 + 2 * 24),
    ],
)
def test_parameters_and_function_match_torchvision(
    mobilenet_v2: nn.Module,
    index: int, in_channels: int, out_channels: int, stride: int, t: int, params: int,
) -> None:
    reference = mobilenet_v2.features[index]
    block = bz.create_block("inverted_residual", in_channels, out_channels, stride,
                            expand_ratio=t)
    assert n_params(block) == params == n_params(reference)
    assert block.use_residual == reference.use_res_connect
    assert_same_function(block, reference, in_channels)


def test_parameter_count_of_the_documented_configuration() -> None:
    assert n_params(bz.create_block("inverted_residual", 24)) == 8_832


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride", "residual"),
    [(24, 24, 1, True), (24, 24, 2, False), (24, 32, 1, False), (16, 16, 1, True)],
)
def test_residual_only_when_stride_1_and_same_width(
    in_channels: int, out_channels: int, stride: int, residual: bool
) -> None:
    block = bz.create_block("inverted_residual", in_channels, out_channels, stride).eval()
    assert block.use_residual is residual
    nn.init.zeros_(block.project.bn.weight)  # the block's own branch now outputs zero
    x = torch.randn(2, in_channels, 7, 5)
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, x if residual else torch.zeros_like(y), rtol=0, atol=0)


def test_expansion_widths_relu6_and_linear_projection() -> None:
    block = bz.create_block("inverted_residual", 16, 24, expand_ratio=1)
    assert isinstance(block.expand, nn.Identity) and block.hidden_channels == 16
    block = bz.create_block("inverted_residual", 10, 24, expand_ratio=2.5)
    assert block.hidden_channels == 25 and block.expand.conv.out_channels == 25
    block = bz.create_block("inverted_residual", 16, 24, expand_ratio=0.5)
    assert block.hidden_channels == 8 and isinstance(block.expand.act, nn.ReLU6)
    block = bz.create_block("inverted_residual", 16, 16).train()
    assert block.hidden_channels == 96 and block.depthwise.conv.groups == 96
    assert block.depthwise.conv.stride == (1, 1) and block.expand.conv.stride == (1, 1)
    assert isinstance(block.depthwise.act, nn.ReLU6) and isinstance(block.project.act, nn.Identity)
    seen: dict[str, torch.Tensor] = {}
    block.depthwise.register_forward_hook(lambda m, i, o: seen.update(dw=o))
    block.project.register_forward_hook(lambda m, i, o: seen.update(proj=o))
    nn.init.constant_(block.depthwise.bn.weight, 10.0)  # BN output well beyond [0, 6]
    block(torch.randn(2, 16, 6, 6))
    assert seen["dw"].min() == 0 and seen["dw"].max() == 6  # clipped at both ends by ReLU6
    assert seen["proj"].min() < 0  # linear bottleneck: no activation after the projection
    stride2 = bz.create_block("inverted_residual", 16, 24, 2)
    assert stride2.depthwise.conv.stride == (2, 2)


@pytest.mark.parametrize("attention", ["coord_att", "se"])
def test_attention_sits_after_the_depthwise_conv_on_the_hidden_channels(attention: str) -> None:
    block = bz.create_block("inverted_residual", 24, attention=attention).eval()
    assert isinstance(block.attention, bz.block_info(attention).cls)
    assert block.attention.in_channels == 144
    seen: dict[str, torch.Tensor] = {}
    block.depthwise.register_forward_hook(lambda m, i, o: seen.update(dw=o))
    block.attention.register_forward_hook(lambda m, i, o: seen.update(att_in=i[0], att=o))
    block.project.register_forward_hook(lambda m, i, o: seen.update(proj_in=i[0]))
    x = torch.randn(2, 24, 9, 7)
    with torch.no_grad():
        y = block(x)
    assert seen["att_in"] is seen["dw"] and seen["proj_in"] is seen["att"]
    assert not torch.allclose(seen["att"], seen["dw"])
    with torch.no_grad():
        torch.testing.assert_close(y, x + block.project(seen["att"]))


def test_coordinate_attention_mobilenetv2_block_parameters() -> None:
    # Hou et al.'s MobileNetV2: CA on 144 channels, mip = max(8, 144 // 32) = 8:
    # conv1 144 -> 8 (+ bias), BN on 8, conv_h and conv_w 8 -> 144 (+ bias).
    ca = 144 * 8 + 8 + 2 * 8 + 2 * (8 * 144 + 144)
    block = bz.create_block("inverted_residual", 24, attention="coord_att")
    assert block.attention.mip == 8
    assert n_params(block) == 8_832 + ca
    se = bz.create_block("inverted_residual", 24, attention="se", attention_kwargs={"reduction": 4})
    assert se.attention.rd_channels == 36


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="InvertedResidual: stride must be 1 or 2"):
        bz.create_block("inverted_residual", 16, stride=3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="InvertedResidual: expand_ratio must be positive"):
            bz.create_block("inverted_residual", 16, expand_ratio=bad)
    with pytest.raises(ValueError, match="InvertedResidual: .* gives no channels"):
        bz.create_block("inverted_residual", 2, expand_ratio=0.1)
    with pytest.raises(ValueError, match="InvertedResidual: attention must name .*'spd_conv'"):
        bz.create_block("inverted_residual", 16, attention="spd_conv")
