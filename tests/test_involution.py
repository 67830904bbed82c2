"""Involution semantics: the memory-efficient op equals the unfold reference and the paper's sum."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import blockzoo as bz
from blockzoo.blocks.involution import ceil_avg_pool, involution2d, involution_unfold_reference


def _naive(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """The paper's sum written as loops over every output value (float64, tiny inputs only)."""
    n, c, h, w = x.shape
    groups, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    p, cg = (k - 1) // 2, c // groups
    out = torch.zeros(n, c, ho, wo, dtype=torch.float64)
    for b, ch, i, j in itertools.product(range(n), range(c), range(ho), range(wo)):
        for u, v in itertools.product(range(k), range(k)):
            r, q = i * stride + u - p, j * stride + v - p
            if 0 <= r < h and 0 <= q < w:
                out[b, ch, i, j] += kernel[b, ch // cg, u, v, i, j] * x[b, ch, r, q]
    return out


def _operands(n, c, h, w, groups, k, stride, dtype=torch.float32, grad=False):
    ho, wo = -(-h // stride), -(-w // stride)
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=grad)
    kernel = torch.randn(n, groups, k, k, ho, wo, dtype=dtype, requires_grad=grad)
    return x, kernel


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("h", "w"), [(5, 4), (1, 3), (2, 2)])
def test_involution2d_equals_the_naive_float64_sum(stride: int, h: int, w: int) -> None:
    x, kernel = _operands(2, 4, h, w, 2, 3, stride, torch.float64)
    expected = _naive(x, kernel, stride)
    torch.testing.assert_close(involution2d(x, kernel, stride), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        involution_unfold_reference(x, kernel, stride), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize(("h", "w"), [(9, 7), (8, 8), (1, 1), (3, 10), (13, 5)])
def test_involution2d_matches_unfold_reference_forward_and_backward(
    stride: int, k: int, h: int, w: int
) -> None:
    x, kernel = _operands(2, 32, h, w, 2, k, stride, grad=True)
    ours = involution2d(x, kernel, stride)
    reference = involution_unfold_reference(x, kernel, stride)
    assert ours.shape == (2, 32, -(-h // stride), -(-w // stride))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (x, kernel), grad)
    reference_grads = torch.autograd.grad(reference, (x, kernel), grad)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the out-of-place path that compile and ONNX export trace
        torch.testing.assert_close(involution2d(x, kernel, stride), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_involution2d_gradcheck_of_the_hand_written_backward(stride: int) -> None:
    x, kernel = _operands(1, 4, 5, 4, 2, 3, stride, torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, stride), (x, kernel))
    x.requires_grad_(False)  # only one input needing a gradient
    assert torch.autograd.gradcheck(lambda b: involution2d(x, b, stride), (kernel,))


def test_involution2d_saves_nothing_k_squared_times_larger() -> None:
    """Autograd keeps the padded input and the kernel, never the ``K * K`` windows."""
    x, kernel = _operands(2, 16, 12, 10, 1, 7, 1, grad=True)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    padded = 2 * 16 * (12 + 6) * (10 + 6)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        involution2d(x, kernel, 1)
    assert sizes and max(sizes) <= max(padded, kernel.numel())
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        involution_unfold_reference(x, kernel, 1)
    assert max(sizes) == x.numel() * 49  # the reference really materialises the windows


def test_involution2d_traces_into_one_graph_with_its_backward() -> None:
    x, kernel = _operands(2, 8, 9, 7, 2, 3, 2, grad=True)
    compiled = torch.compile(
        lambda a, b: involution2d(a, b, 2), fullgraph=True, backend="aot_eager"
    )
    y = compiled(x, kernel)
    grads = torch.autograd.grad(y.square().sum(), (x, kernel))
    expected = involution_unfold_reference(x, kernel, 2)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(expected.square().sum(), (x, kernel)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_involution2d_kernel_layout_is_row_major_offsets() -> None:
    """A one-hot kernel at offset ``(u, v)`` reads ``x[i + u - p, j + v - p]``: a shift."""
    x = torch.randn(1, 4, 6, 5)
    kernel = torch.zeros(1, 2, 3, 3, 6, 5)
    kernel[:, 0, 0, 2] = 1.0  # group 0: up-right neighbour
    kernel[:, 1, 1, 1] = 1.0  # group 1: the centre, identity
    out = involution2d(x, kernel, 1)
    shifted = F.pad(x[:, :2], (1, 1, 1, 1))[:, :, 0:6, 2:7]
    torch.testing.assert_close(out[:, :2], shifted, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2:], x[:, 2:], rtol=0, atol=0)


def test_involution2d_rejects_bad_operands() -> None:
    x = torch.randn(1, 6, 5, 5)
    for kernel in (torch.randn(1, 4, 3, 3, 5, 5), torch.randn(1, 2, 3, 5, 5, 5),
                   torch.randn(1, 2, 4, 4, 5, 5), torch.randn(1, 2, 3, 5, 5)):
        with pytest.raises(ValueError, match="involution2d"):
            involution2d(x, kernel)
    with pytest.raises(ValueError, match="involution2d.*do not match the output size"):
        involution2d(x, torch.randn(1, 2, 3, 3, 1, 1))  # no silent broadcasting of one kernel
    with pytest.raises(ValueError, match="involution2d.*do not match the output size"):
        involution2d(x, torch.randn(1, 2, 3, 3, 5, 5), stride=2)
    with pytest.raises(ValueError, match="involution2d.*stride"):
        involution2d(x, torch.randn(1, 2, 3, 3, 5, 5), stride=0)


def test_involution2d_mixed_dtypes_promote() -> None:
    x, kernel = _operands(1, 4, 5, 5, 1, 3, 1)
    y = involution2d(x, kernel.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, involution_unfold_reference(x, kernel.bfloat16().float()))


@pytest.mark.parametrize(("h", "w", "stride"), [(5, 7, 2), (1, 1, 2), (4, 9, 2), (7, 8, 3)])
def test_ceil_avg_pool_is_avg_pool_ceil_mode(h: int, w: int, stride: int) -> None:
    x = torch.randn(2, 3, h, w)
    expected = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    torch.testing.assert_close(ceil_avg_pool(x, stride), expected)
    assert expected.shape[-2:] == (-(-h // stride), -(-w // stride))


def test_ceil_avg_pool_averages_only_the_valid_pixels_of_edge_blocks() -> None:
    x = torch.arange(15.0).reshape(1, 1, 3, 5)
    pooled = ceil_avg_pool(x, 2)
    assert pooled[0, 0, 0, 2] == (4.0 + 9.0) / 2  # right edge: one column
    assert pooled[0, 0, 1, 0] == (10.0 + 11.0) / 2  # bottom edge: one row
    assert pooled[0, 0, 1, 2] == 14.0  # the corner: one pixel


def test_involution_structure_and_parameter_count() -> None:
    block = bz.Involution(64)
    assert (block.kernel_size, block.group_channels, block.groups, block.reduced) == (7, 16, 4, 16)
    conv = block.reduce.conv
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.out_channels == 16
    assert isinstance(block.reduce.bn, torch.nn.BatchNorm2d)
    assert isinstance(block.reduce.act, torch.nn.ReLU)
    assert block.span.out_channels == 7 * 7 * 4 and block.span.bias is not None
    # 64*16 (reduce) + 2*16 (BN) + 16*196 + 196 (span with bias)
    assert sum(p.numel() for p in block.parameters()) == 64 * 16 + 32 + 16 * 196 + 196


@pytest.mark.parametrize("stride", [1, 2])
def test_involution_block_is_the_paper_formula(stride: int) -> None:
    block = bz.Involution(32, stride=stride, kernel_size=5).eval()
    x = torch.randn(2, 32, 9, 6)
    pooled = F.avg_pool2d(x, stride, stride, ceil_mode=True) if stride > 1 else x
    weight = block.span(F.relu(block.reduce.bn(block.reduce.conv(pooled))))
    kernel = weight.reshape(2, 2, 5, 5, weight.shape[2], weight.shape[3])
    expected = involution_unfold_reference(x, kernel, stride)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.explain(x)["kernels"], kernel)


def test_involution_batch_one_on_a_one_pixel_map_trains() -> None:
    block = bz.Involution(16, stride=2).train()
    before = block.reduce.bn.running_mean.clone()
    y = block(torch.randn(1, 16, 1, 1))
    y.sum().backward()
    assert y.shape == (1, 16, 1, 1)
    torch.testing.assert_close(block.reduce.bn.running_mean, before)  # running stats used


def test_involution_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Involution.*multiple of group_channels"):
        bz.Involution(24)  # 24 channels, groups of 16
    with pytest.raises(ValueError, match="Involution.*multiple of group_channels"):
        bz.Involution(8)  # fewer channels than one group
    assert bz.Involution(24, group_channels=8).groups == 3
    for kwargs in ({"kernel_size": 4}, {"kernel_size": 0}, {"reduction": 0}, {"stride": 3},
                   {"out_channels": 32}):
        with pytest.raises(ValueError, match="Involution"):
            bz.Involution(16, **kwargs)


def test_profiler_counts_the_aggregation_through_extra_flops() -> None:
    from blockzoo.core import count_flops

    block = bz.Involution(32, stride=2, kernel_size=7).eval()
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        total = count_flops(block, x)
    convs = 2 * 2 * 5 * 4 * (32 * 8 + 8 * 49 * 2)  # reduce (no bias) and span 1x1 convs
    aggregation = 2 * 2 * 32 * 5 * 4 * 49
    pool = 2 * 2 * 32 * 9 * 7  # the stride's average pool before the kernel generator
    assert block.extra_flops(x) == aggregation + pool
    assert total == convs + aggregation + pool
