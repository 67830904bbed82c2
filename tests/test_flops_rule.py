"""One FLOPs rule for every block (docs/profiling.md): each block's ``extra_flops`` declares
its elementwise multiply-adds on feature-map-sized tensors, checked here against a hand formula.

The formulas count multiply-adds (``macs``); the hook returns FLOPs, 2 per multiply-add. Each
formula covers the block's own work only: blocks inside a block declare theirs themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import blockzoo as bz
from blockzoo.core import count_flops


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# macs(block, n, c, h, w): n, c, h, w of the input; ho, wo below are the output's size.
Formula = Callable[[nn.Module, int, int, int, int], int]


def _out(block: nn.Module, n: int, h: int, w: int) -> int:
    """N * C_out * Ho * Wo."""
    return n * block.out_channels * _ceil(h, block.stride) * _ceil(w, block.stride)


def _shortcut(block: nn.Module, n: int, c: int, h: int, w: int) -> int:
    return _out(block, n, h, w)  # one add per output value


def _nothing(block: nn.Module, n: int, c: int, h: int, w: int) -> int:
    return 0


def _cell(pools: int) -> Formula:
    def macs(block: nn.Module, n: int, c: int, h: int, w: int) -> int:
        cc = block.cell_channels
        return 5 * n * cc * h * w + pools * n * cc * (3 * h - 2) * (3 * w - 2)

    return macs


HAND: dict[str, Formula] = {
    # attention: pooling over positions (1 per input value) and gates (1 per output value)
    "se": lambda b, n, c, h, w: 2 * n * c * h * w,  # squeeze + x * s
    "gc": lambda b, n, c, h, w: 2 * n * c * h * w,  # context pooling + x + T(c)
    "coord_att": lambda b, n, c, h, w: 4 * n * c * h * w,  # 2 poolings + x * a_h * a_w
    # avg pool + x * M_c + channel mean + x' * M_s (max pools are compares)
    "cbam": lambda b, n, c, h, w: 4 * n * c * h * w,
    "eca": lambda b, n, c, h, w: 2 * n * c * h * w,  # pool + x * s
    # mean, (x - mu)^2, sum of d, d * a + 0.5, x * sigmoid(.)
    "simam": lambda b, n, c, h, w: 5 * n * c * h * w,
    # conv kind
    "sk_conv": lambda b, n, c, h, w: 2 * 2 * _out(b, n, h, w),  # M=2: fuse, pool, weighted sum
    "dynamic_conv": lambda b, n, c, h, w: n * c * h * w,  # routing pool; aggregation is a matmul
    "cond_conv": lambda b, n, c, h, w: n * c * h * w,  # routing pool
    "involution": lambda b, n, c, h, w: _out(b, n, h, w) * 49 + (n * c * h * w if b.stride > 1
                                                                 else 0),
    "acmix": lambda b, n, c, h, w: 2 * n * b.out_channels * h * w + (2 * 49 + 2) * _out(b, n, h,
                                                                                        w),
    "deform_conv": lambda b, n, c, h, w: 4 * c * 9 * _out(b, n, h, w) // b.out_channels,
    "mdeform_conv": lambda b, n, c, h, w: 5 * c * 9 * _out(b, n, h, w) // b.out_channels,
    "separable_conv": _nothing,
    "spd_conv": _nothing,
    # blocks: the shortcut add
    "basic_residual": _shortcut,
    "residual": _shortcut,
    "resnext": _shortcut,
    "sk_unit": _shortcut,
    "inverted_residual": lambda b, n, c, h, w: n * c * h * w if b.use_residual else 0,
    "bottleneck": _nothing,
    "dynamic_conv_bn_act": _nothing,  # its DynamicConv2d declares the routing pool
    "dense": _nothing,  # concatenation
    "inception": _nothing,  # concatenation; max pooling compares
    "inception_naive": _nothing,
    # cells: 5 branch adds and three 3x3 average pools (padding excluded)
    "nasnet_normal_cell": _cell(pools=3),
    "amoebanet_normal_cell": _cell(pools=3),
}

KWARGS = {
    "deform_conv": {"impl": "torch"},
    "mdeform_conv": {"impl": "torch"},
    "nasnet_normal_cell": {"cell_channels": 8},
    "amoebanet_normal_cell": {"cell_channels": 8},
}


def test_every_block_states_its_elementwise_work() -> None:
    missing = sorted(set(bz.list_blocks()) - set(HAND))
    assert not missing, f"add the hand formula of {missing} (docs/profiling.md, FLOPs rule)"


@pytest.mark.parametrize("name", sorted(HAND))
def test_declared_flops_match_the_hand_formula(name: str) -> None:
    info = bz.block_info(name)
    n, c, h, w = 2, 64, 9, 7
    for stride in info.strides:
        block = bz.create_block(name, c, stride=stride, **KWARGS.get(name, {})).eval()
        x = torch.randn(n, c, h, w)
        declared = block.extra_flops(x) if hasattr(block, "extra_flops") else 0
        assert declared == 2 * HAND[name](block, n, c, h, w), f"{name} stride {stride}"


def test_se_total_is_its_convs_plus_the_declared_work() -> None:
    se = bz.create_block("se", 32).eval()
    x = torch.randn(2, 32, 10, 6)
    rd = se.fc1.out_channels
    with torch.no_grad():
        total = count_flops(se, x)
    assert total == 2 * 2 * (32 * rd + rd * 32) + 2 * 2 * 2 * 32 * 10 * 6


def test_nested_blocks_add_their_declarations() -> None:
    """A residual block with SE inside: counter + shortcut add + SE's pool and gate."""
    block = bz.create_block("basic_residual", 16, attention="se").eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            block(x)
        total = count_flops(block, x)
    elements = 16 * 8 * 8
    assert total == counter.get_total_flops() + 2 * elements + 2 * 2 * elements


def test_surgery_gate_declares_its_blend() -> None:
    from blockzoo.surgery import GatedResidual

    gated = GatedResidual(bz.create_block("se", 16)).eval()
    x = torch.randn(2, 16, 5, 3)
    assert gated.extra_flops(x) == 2 * 2 * 2 * 16 * 5 * 3
    with torch.no_grad():
        assert count_flops(gated, x) == count_flops(gated.block, x) + 2 * 2 * x.numel()


@pytest.mark.parametrize("name", ["involution", "acmix", "deform_conv", "mdeform_conv"])
def test_count_is_the_same_on_the_compiled_kernels_and_the_reference_forms(name: str) -> None:
    """The compiled kernels may compute the same function with other products (a padded
    matrix product, a folded conv): the count is the reference forms', whichever runs."""
    from blockzoo import ops

    block = bz.create_block(name, 16).eval()
    x = torch.randn(2, 16, 12, 10)
    with ops.fast_ops(False), FlopCounterMode(display=False) as counter:
        block(x)
    expected = counter.get_total_flops() + block.extra_flops(x)
    for enabled in (True, False):
        with ops.fast_ops(enabled):
            assert count_flops(block, x) == expected
