"""Semantics of the NASNet-A and AmoebaNet-A normal cells beyond the contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockzoo as bz

CELLS = [bz.NASNetNormalCell, bz.AmoebaNetNormalCell]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sep_twice(c: int, k: int) -> int:
    """(ReLU -> depthwise k x k + pointwise 1x1 -> BN) twice, all convs without bias."""
    return 2 * (k * k * c + c * c + 2 * c)


def _describe(op: nn.Module) -> str:
    """The op's name in the papers' vocabulary, read off the module structure."""
    if isinstance(op, nn.Identity):
        return "identity"
    if isinstance(op, nn.AvgPool2d):
        assert (op.kernel_size, op.stride, op.padding) == (3, 1, 1)
        assert op.count_include_pad is False
        return "avg3x3"
    if isinstance(op, nn.MaxPool2d):
        assert (op.kernel_size, op.stride, op.padding) == (3, 1, 1)
        return "max3x3"
    relu1, sep1, relu2, sep2 = op  # ReLU-sepconv-BN twice
    assert isinstance(relu1, nn.ReLU) and isinstance(relu2, nn.ReLU)
    assert isinstance(sep1, bz.SeparableConv) and isinstance(sep2, bz.SeparableConv)
    for sep in (sep1, sep2):
        assert isinstance(sep.pw.bn, nn.BatchNorm2d) and isinstance(sep.pw.act, nn.Identity)
        assert isinstance(sep.dw.bn, nn.Identity) and isinstance(sep.dw.act, nn.Identity)
    k = sep1.kernel_size
    assert sep2.kernel_size == k
    return f"sep{k}x{k}"


def test_nasnet_a_normal_cell_is_figure_4_left() -> None:
    cell = bz.NASNetNormalCell(24, prev_channels=40, cell_channels=8).eval()
    ops = [[_describe(op) for op in pair] for pair in cell.ops]
    assert ops == [
        ["sep5x5", "sep3x3"], ["sep5x5", "sep3x3"], ["avg3x3", "identity"],
        ["avg3x3", "avg3x3"], ["sep3x3", "identity"],
    ]
    x, prev = torch.randn(2, 24, 7, 6), torch.randn(2, 40, 7, 6)
    h0, h1 = cell.preprocess_x(x), cell.preprocess_prev(prev)
    o = cell.ops
    c0 = o[0][0](h0) + o[0][1](h1)
    c1 = o[1][0](h1) + o[1][1](h1)
    c2 = o[2][0](h0) + h1
    c3 = o[3][0](h1) + o[3][1](h1)
    c4 = o[4][0](h0) + h0
    expected = torch.cat([h1, c0, c1, c2, c3, c4], 1)
    torch.testing.assert_close(cell(x, prev), expected, rtol=0, atol=0)
    assert cell.out_channels == 6 * 8


def test_amoebanet_a_normal_cell_is_figure_4() -> None:
    cell = bz.AmoebaNetNormalCell(24, prev_channels=40, cell_channels=8).eval()
    ops = [[_describe(op) for op in pair] for pair in cell.ops]
    assert ops == [
        ["avg3x3", "max3x3"], ["sep3x3", "identity"], ["identity", "avg3x3"],
        ["sep3x3", "sep5x5"], ["avg3x3", "sep3x3"],
    ]
    x, prev = torch.randn(2, 24, 7, 6), torch.randn(2, 40, 7, 6)
    h0, h1 = cell.preprocess_x(x), cell.preprocess_prev(prev)
    o = cell.ops
    c0 = o[0][0](h0) + o[0][1](h0)
    c1 = o[1][0](h1) + h1
    c2 = h0 + o[2][1](h1)
    c3 = o[3][0](h0) + o[3][1](c0)
    c4 = o[4][0](c3) + o[4][1](h0)
    expected = torch.cat([h1, c1, c2, c4], 1)  # c0 and c3 are consumed inside the cell
    torch.testing.assert_close(cell(x, prev), expected, rtol=0, atol=0)
    assert cell.out_channels == 4 * 8


def test_parameter_counts_by_hand() -> None:
    c = 8
    # ReLU -> 1x1 conv (no bias) -> BN on each input, then the separable ops
    inputs = 24 * c + 2 * c + 40 * c + 2 * c
    nasnet = bz.NASNetNormalCell(24, prev_channels=40, cell_channels=c)
    assert _count(nasnet) == inputs + 2 * _sep_twice(c, 5) + 3 * _sep_twice(c, 3) == 2576
    amoeba = bz.AmoebaNetNormalCell(24, prev_channels=40, cell_channels=c)
    assert _count(amoeba) == inputs + _sep_twice(c, 5) + 3 * _sep_twice(c, 3) == 2016


@pytest.mark.parametrize("cls", CELLS)
def test_two_inputs_of_different_channel_counts(cls: type) -> None:
    cell = cls(24, prev_channels=40, cell_channels=8).train()
    x = torch.randn(2, 24, 5, 9, requires_grad=True)
    prev = torch.randn(2, 40, 5, 9, requires_grad=True)
    y = cell(x, prev)
    assert y.shape == (2, cell.out_channels, 5, 9)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert prev.grad is not None and prev.grad.abs().sum() > 0
    # prev comes first in the concatenation, after its ReLU -> 1x1 conv -> BN
    cell.eval()
    torch.testing.assert_close(cell(x, prev)[:, :8], cell.preprocess_prev(prev))
    assert cell.preprocess_prev[1].conv.in_channels == 40
    assert cell.preprocess_x[1].conv.in_channels == 24


@pytest.mark.parametrize("cls", CELLS)
def test_prev_defaults_to_x(cls: type) -> None:
    cell = cls(16, cell_channels=4).eval()
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(cell(x), cell(x, x), rtol=0, atol=0)
    # the two inputs keep separate 1x1 convs even when prev is x
    assert cell.preprocess_x[1].conv.weight is not cell.preprocess_prev[1].conv.weight


@pytest.mark.parametrize("cls", CELLS)
def test_rejects_bad_prev_naming_the_cell_and_shapes(cls: type) -> None:
    name = cls.__name__
    cell = cls(16, prev_channels=24, cell_channels=4)
    x = torch.randn(2, 16, 8, 8)
    for prev in (torch.randn(2, 16, 8, 8), torch.randn(24, 8, 8)):
        with pytest.raises(ValueError, match=rf"{name}.*\(N, 24, H, W\).*{tuple(prev.shape)}"):
            cell(x, prev)
    for prev in (torch.randn(2, 24, 8, 7), torch.randn(3, 24, 8, 8)):
        with pytest.raises(ValueError, match=rf"{name}.*{tuple(x.shape)}.*{tuple(prev.shape)}"):
            cell(x, prev)
    with pytest.raises(ValueError, match=f"{name}.*dtype"):
        cell(x, torch.ones(2, 24, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"{name}.*torch.float32.*torch.float64"):
        cell(x, torch.randn(2, 24, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"{name}.*prev defaults to x.*16.*24"):
        cell(x)


@pytest.mark.parametrize(("cls", "states"), [(bz.NASNetNormalCell, 6),
                                             (bz.AmoebaNetNormalCell, 4)])
def test_structural_width_and_defaults(cls: type, states: int) -> None:
    cell = cls(96)
    assert cell.cell_channels == 96 // states and cell.out_channels == 96  # width kept
    assert cell.prev_channels == 96
    assert cls(64).out_channels == states * (64 // states)
    with pytest.raises(ValueError, match=f"{cls.__name__}.*structural.*{states * 8}"):
        cls(16, 16, cell_channels=8)
    assert cls(16, states * 8, cell_channels=8).out_channels == states * 8
    for bad in ({"cell_channels": 0}, {"prev_channels": -3}):
        with pytest.raises(ValueError, match=cls.__name__):
            cls(16, **bad)


def test_average_pool_excludes_padding() -> None:
    cell = bz.NASNetNormalCell(16, cell_channels=4)
    ones = torch.ones(1, 4, 5, 5)
    torch.testing.assert_close(cell.ops[2][0](ones), ones)  # borders too: count_include_pad off
