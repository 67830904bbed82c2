"""The compiled CPU operators (``blockzoo.ops``) against the PyTorch reference forms.

Every check runs on the fast path where numba is installed, and the fallback is checked under
``fast_ops(False)``: equal outputs and gradients (1e-5, float32), gradcheck in float64, custom-op
registration (``opcheck``), one operator under ``torch.compile(fullgraph=True)``, bitwise
determinism, channels_last / non-contiguous / empty / 1x1 inputs, and non-finite values.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import blockzoo as bz
from blockzoo import ops
from blockzoo.blocks.acmix import acmix_attention_unfold_reference, local_window_attention
from blockzoo.blocks.deform import deform_conv2d_torch, implementation
from blockzoo.blocks.involution import involution2d, involution_unfold_reference

from . import test_contract
from .contract import deterministic_algorithms

needs_numba = pytest.mark.skipif(not ops.fast_ops_available(), reason="numba is not installed")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _grads(fn, inputs, grad):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad))


def _assert_same(a, b, **tol) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **(tol or TOL))


# ---------------------------------------------------------------------------------------------
# involution


def _involution_operands(n=2, c=8, h=9, w=7, groups=2, k=3, stride=1, dtype=torch.float32):
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    kernel = torch.randn(n, groups, k, k, -(-h // stride), -(-w // stride), dtype=dtype,
                         requires_grad=True)
    return x, kernel


@needs_numba
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("h", "w", "k"), [(9, 7, 3), (8, 8, 7), (1, 1, 7), (3, 10, 5)])
def test_involution_fast_equals_fallback_and_unfold(stride: int, h: int, w: int, k: int) -> None:
    x, kernel = _involution_operands(2, 32, h, w, 2, k, stride)
    grad = torch.randn(2, 32, -(-h // stride), -(-w // stride))

    def op(a, b):
        return involution2d(a, b, stride)

    fast = _grads(op, (x, kernel), grad)
    with ops.fast_ops(False):
        fallback = _grads(op, (x, kernel), grad)
    unfold = _grads(lambda a, b: involution_unfold_reference(a, b, stride), (x, kernel), grad)
    _assert_same(fast, fallback)
    _assert_same(fast, unfold)


@needs_numba
def test_involution_fast_path_is_the_custom_op() -> None:
    x, kernel = _involution_operands()
    with torch.profiler.profile() as prof:
        involution2d(x, kernel).sum().backward()
    names = {event.name for event in prof.events()}
    assert "blockzoo::involution_aggregate" in names
    assert "blockzoo::involution_aggregate_backward" in names
    with ops.fast_ops(False), torch.profiler.profile() as prof:
        involution2d(x, kernel).sum().backward()
    assert "blockzoo::involution_aggregate" not in {event.name for event in prof.events()}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_involution_gradcheck_float64(fast: bool, stride: int) -> None:
    x, kernel = _involution_operands(1, 4, 5, 4, 2, 3, stride, torch.float64)
    with ops.fast_ops(fast):
        assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, stride), (x, kernel))


@needs_numba
def test_involution_opcheck() -> None:
    x, kernel = _involution_operands(1, 4, 5, 4, 2, 3, 1)
    torch.library.opcheck(ops.involution_aggregate, (x, kernel, 1))
    rows = torch.randn(1, 2, 3, 3, 5, 4 + 1, requires_grad=True)  # rows padded by (K - 1) / 2
    torch.library.opcheck(ops.involution_aggregate, (x, rows, 1))
    rows = torch.randn(1, 2, 3, 3, 3, 2 + 1, requires_grad=True)
    torch.library.opcheck(ops.involution_aggregate, (x, rows, 2))


def _naive_involution(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """The defining sum, one offset at a time, on a zero-padded float64 copy."""
    n, c, h, w = x.shape
    groups, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    p = (k - 1) // 2
    xp = torch.nn.functional.pad(x.double(), (p, p + stride, p, p + stride))
    weights = kernel.double().repeat_interleave(c // groups, dim=1)
    out = torch.zeros(n, c, ho, wo, dtype=torch.float64)
    for u in range(k):
        for v in range(k):
            window = xp[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride]
            out += weights[:, :, u, v] * window
    return out


@needs_numba
@pytest.mark.parametrize("span", [40, 4096])
@pytest.mark.parametrize("channels", [32, 30])
@pytest.mark.parametrize(("h", "w", "k"), [(45, 37, 7), (40, 13, 3), (31, 30, 5), (3, 2, 7)])
def test_involution_kernel_rows_in_blocks_match_the_naive_sum(
    h, w, k, channels, span, monkeypatch
) -> None:
    """The stride-1 operator in blocks of rows (``span = 40`` values: several blocks per plane,
    the last one shorter; the default: one block), with the seven-offset passes (K = 7: two
    channels at a time, and one for the last of an odd count: 15 channels per group) and the
    one-offset passes (other K): output and both gradients against the float64 sum, in float32
    and float64."""
    from blockzoo.ops import involution as involution_ops

    monkeypatch.setattr(involution_ops, "_SPAN", span)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        x, kernel = _involution_operands(2, channels, h, w, 2, k, 1, dtype)
        grad = torch.randn(2, channels, h, w, dtype=dtype)
        got = _grads(lambda a, b: involution2d(a, b), (x, kernel), grad)
        x64 = x.detach().double().requires_grad_()
        k64 = kernel.detach().double().requires_grad_()
        expected = _grads(lambda a, b: _naive_involution(a, b, 1), (x64, k64), grad.double())
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@needs_numba
@pytest.mark.parametrize("stride", [1, 2])
def test_involution_operator_takes_kernel_rows_padded_by_ignored_values(stride: int) -> None:
    """A kernel ``(N, G, K, K, Ho, Wo + p)`` gives the results of its first ``Wo`` columns,
    whatever finite values the padding holds, and a gradient of exactly zero there, also next
    to non-finite inputs."""
    x, kernel = _involution_operands(2, 32, 30, 20, 2, 7, stride)
    x = x.detach().clone()
    x[0, 3, 5, -1] = float("inf")
    kernel = kernel.detach()
    rows = torch.cat([kernel, torch.randn(*kernel.shape[:-1], 3) * 1e3], dim=-1)
    grad = torch.randn(2, 32, kernel.shape[4], kernel.shape[5])
    plain = _grads(lambda a, b: ops.involution_aggregate(a, b, stride),
                   (x.requires_grad_(), kernel.requires_grad_()), grad)
    padded = _grads(lambda a, b: ops.involution_aggregate(a, b, stride),
                    (x, rows.requires_grad_()), grad)
    torch.testing.assert_close(padded[0], plain[0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(padded[1], plain[1], equal_nan=True, **TOL)
    torch.testing.assert_close(padded[2][..., :-3], plain[2], equal_nan=True, **TOL)
    assert (padded[2][..., -3:] == 0).all()
    assert not plain[0].isfinite().all() and not plain[2].isfinite().all()


@needs_numba
def test_involution_block_fast_path_runs_hooked_or_wrapped_convs_as_modules() -> None:
    """The fast path runs the 1x1 convs as matrix products with their parameters, unless a
    hook or a wrapper is on them: then they run as modules (the hooks see them) with the
    same results."""
    torch.manual_seed(0)
    block = bz.Involution(32, dtype=torch.float64)
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64)
    with ops.fast_ops(False):
        expected = block(x)
    calls: list[str] = []
    names = ("span", "reduce.conv", "reduce.bn", "reduce.act", "reduce")
    for name in names:
        module = block.get_submodule(name)
        handle = module.register_forward_hook(lambda *args, name=name: calls.append(name))
        with ops.fast_ops(True):
            torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
        handle.remove()
    assert calls == list(names)
    seen: list[torch.nn.Module] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *args: seen.append(module)
    )
    try:
        with ops.fast_ops(True):
            torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    finally:
        handle.remove()
    assert all(any(m is block.get_submodule(name) for m in seen) for name in names)
    with ops.fast_ops(True):
        assert block(x[:0]).shape == (0, 32, 9, 11)  # batch 0: nothing to infer a size from
    block.span = torch.nn.Sequential(block.span)  # a wrapper (as surgery makes)
    with ops.fast_ops(True):
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
        assert block(x[:0]).shape == (0, 32, 9, 11)  # batch 0: nothing to infer a size from


@needs_numba
@pytest.mark.parametrize("stride", [1, 2])
def test_involution_block_fast_path_equals_its_reference_form(stride: int) -> None:
    """The block makes the operator's padded kernel rows with its own 1x1 conv: output, input
    gradient and every parameter gradient equal the reference form's (train mode, float64:
    in float32 the batch norm's backward alone differs by more than 1e-5 between any two
    summation orders)."""
    torch.manual_seed(0)
    block = bz.Involution(32, stride=stride, dtype=torch.float64).train()
    x = torch.randn(2, 32, 29, 23, requires_grad=True, dtype=torch.float64)
    grad = torch.randn(2, 32, -(-29 // stride), -(-23 // stride), dtype=torch.float64)
    results = []
    for fast in (True, False):
        with ops.fast_ops(fast), torch.profiler.profile() as prof:
            out = block(x)
            grads = torch.autograd.grad(out, (x, *block.parameters()), grad)
        names = {event.name for event in prof.events()}
        assert ("blockzoo::involution_aggregate_backward" in names) == fast
        results.append((out, *grads))
    _assert_same(*results, rtol=1e-10, atol=1e-10)
    with ops.fast_ops(True):
        assert block.generate_kernel(x).shape == (2, 2, 7, 7, -(-29 // stride), -(-23 // stride))


@pytest.mark.parametrize("fast", [True, False])
def test_involution_deterministic_bitwise(fast: bool) -> None:
    x, kernel = _involution_operands(2, 32, 11, 9, 2, 7, 2)
    with deterministic_algorithms(), ops.fast_ops(fast):
        runs = [_grads(lambda a, b: involution2d(a, b, 2), (x, kernel),
                       torch.ones(2, 32, 6, 5)) for _ in range(2)]
    _assert_same(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_involution_channels_last_non_contiguous_and_empty(fast: bool) -> None:
    x, kernel = _involution_operands(2, 16, 6, 5, 1, 3, 1)
    expected = involution_unfold_reference(x, kernel)
    with ops.fast_ops(fast):
        cl = x.detach().to(memory_format=torch.channels_last)
        torch.testing.assert_close(involution2d(cl, kernel), expected, **TOL)
        wide = torch.randn(2, 16, 6, 10)[..., ::2].copy_(x.detach())
        assert not wide.is_contiguous()
        torch.testing.assert_close(involution2d(wide, kernel.transpose(-1, -2).contiguous()
                                                .transpose(-1, -2)), expected, **TOL)
        empty_x, empty_k = _involution_operands(0, 16, 6, 5, 1, 3, 2)
        out = involution2d(empty_x, empty_k, 2)
        assert out.shape == (0, 16, 3, 3)
        out.sum().backward()
        assert empty_x.grad.shape == empty_x.shape and empty_k.grad.shape == empty_k.shape


@pytest.mark.parametrize("fast", [True, False])
def test_involution_non_finite_values_propagate_like_the_reference(fast: bool) -> None:
    x, kernel = _involution_operands(1, 4, 6, 6, 1, 3, 1)
    x, kernel = x.detach().clone(), kernel.detach().clone()
    x[0, 1, 2, 3], x[0, 2, 0, 0] = float("nan"), float("inf")
    kernel[0, 0, 0, 0, 0, 0] = float("-inf")  # reads the zero padding: inf * 0 = nan
    expected = involution_unfold_reference(x, kernel)
    with ops.fast_ops(fast):
        out = involution2d(x, kernel)
    torch.testing.assert_close(out, expected, equal_nan=True, **TOL)
    assert out.isnan().any() and out.isfinite().any()


@needs_numba
def test_involution_compiles_to_one_op_and_matches_eager() -> None:
    x, kernel = _involution_operands(2, 8, 9, 7, 2, 3, 2)
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: involution2d(a, b, 2), fullgraph=True, backend=backend)
    got = _grads(compiled, (x, kernel), torch.ones(2, 8, 5, 4))
    _assert_same(got, _grads(lambda a, b: involution2d(a, b, 2), (x, kernel),
                             torch.ones(2, 8, 5, 4)))
    assert any("involution_aggregate" in target for target in seen)


# ---------------------------------------------------------------------------------------------
# deformable convolution

DEFORM_CASES = [  # (stride, padding, dilation, groups, offset_groups, mask)
    (1, 1, 1, 1, 1, False),
    (1, 1, 1, 1, 1, True),
    (2, 1, 1, 2, 2, True),
    (1, 2, 2, 1, 2, False),
]


def _deform_problem(case, dtype=torch.float32, n=2, h=7, w=6, scale=2.0):
    stride, padding, dilation, groups, offset_groups, with_mask = case
    x = torch.randn(n, 4, h, w, dtype=dtype)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    ho = (h + 2 * padding - 2 * dilation - 1) // stride + 1
    wo = (w + 2 * padding - 2 * dilation - 1) // stride + 1
    offset = torch.randn(n, 2 * offset_groups * 9, ho, wo, dtype=dtype) * scale
    mask = torch.rand(n, offset_groups * 9, ho, wo, dtype=dtype) if with_mask else None
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    return (x, offset, weight, bias, mask), kw


def _deform_grads(fn, tensors, kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, weight, bias, mask = leaves
    out = fn(x, offset, weight, bias, mask=mask, **kw)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, torch.ones_like(out) * 0.5)
    return (out, *grads)


@needs_numba
@pytest.mark.parametrize("case", DEFORM_CASES)
def test_deform_fast_equals_torch_and_torchvision(case) -> None:
    tensors, kw = _deform_problem(case)
    fast = _deform_grads(ops.deform_conv2d, tensors, kw)
    _assert_same(fast, _deform_grads(deform_conv2d_torch, tensors, kw), rtol=1e-5, atol=3e-5)
    _assert_same(fast, _deform_grads(tv_deform_conv2d, tensors, kw), rtol=1e-5, atol=3e-5)


@needs_numba
@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_fast_gradcheck_float64(with_mask: bool) -> None:
    case = (1, 1, 1, 1, 1, with_mask)
    tensors, kw = _deform_problem(case, torch.float64, n=1, h=4, w=5, scale=1.3)
    inputs = tuple(t.requires_grad_() for t in tensors if t is not None)

    def fn(x, offset, weight, bias, *mask):
        return ops.deform_conv2d(x, offset, weight, bias, mask=mask[0] if mask else None, **kw)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-4)


@needs_numba
@pytest.mark.parametrize("channels_last", [False, True])
def test_deform_opcheck(channels_last: bool) -> None:
    """Registration, fake tensors (shapes and strides, also for channels-last operands as the
    blocks pass them) and autograd of the custom op, with and without bias."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for case, with_bias in zip(DEFORM_CASES[1:3], (False, True), strict=True):
        (x, offset, _, bias, mask), kw = _deform_problem(case, n=1, h=5, w=4)
        geometry = [3, 3, kw["stride"], kw["stride"], kw["padding"], kw["padding"],
                    kw["dilation"], kw["dilation"]]
        weight = torch.randn(6, 4 // case[3], 3, 3).to(memory_format=layout).requires_grad_()
        x, offset, mask = (t.to(memory_format=layout).requires_grad_() for t in (x, offset, mask))
        args = (x, offset, mask, weight, geometry, bias.requires_grad_() if with_bias else None)
        torch.library.opcheck(ops.deform_conv2d_op, args)
        grad = torch.randn(ops.deform_conv2d_op(*args).shape)
        backward_args = (grad, x.detach(), offset.detach(), mask.detach(), weight.detach(),
                         geometry)
        torch.library.opcheck(ops.deform_conv2d_backward, backward_args)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [DEFORM_CASES[1], DEFORM_CASES[2]])
def test_deform_fast_tiles_and_parallel_samples_match_float64(case, threads, monkeypatch) -> None:
    """Column tiles much smaller than a sample (and ending inside one), and samples processed
    in parallel in the backward (3 samples on 2 threads): equal to torchvision in float64, as
    with one tile per call."""
    from blockzoo.ops import deform as deform_module

    tensors, kw = _deform_problem(case, torch.float64, n=3, h=9, w=7, scale=2.5)
    expected = _deform_grads(tv_deform_conv2d, tensors, kw)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = _deform_grads(ops.deform_conv2d, tensors, kw)
        columns = 4 * 9 * 8  # C * taps * float64 bytes: a row of columns
        monkeypatch.setattr(deform_module, "_TILE_BYTES", 5 * columns)  # 5-row tiles
        tiled = _deform_grads(ops.deform_conv2d, tensors, kw)
    finally:
        torch.set_num_threads(previous)
    _assert_same(tiled, expected, rtol=1e-10, atol=1e-10)
    _assert_same(whole, expected, rtol=1e-10, atol=1e-10)


@needs_numba
@pytest.mark.parametrize(("groups", "offset_groups"), [(3, 2), (2, 3), (6, 1), (1, 6)])
def test_deform_fast_groups_not_aligned_with_offset_groups(groups, offset_groups) -> None:
    """Conv groups and offset groups that split each other's channels (6 channels): equal to
    torchvision in float64, with a mask, stride 2 and dilation 2."""
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    weight = torch.randn(12, 6 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    offset = torch.randn(2, 2 * offset_groups * 9, 4, 4, dtype=torch.float64) * 2
    mask = torch.rand(2, offset_groups * 9, 4, 4, dtype=torch.float64)
    kw = {"stride": 2, "padding": 1, "dilation": 2}
    tensors = (x, offset, weight, bias, mask)
    _assert_same(_deform_grads(ops.deform_conv2d, tensors, kw),
                 _deform_grads(tv_deform_conv2d, tensors, kw), rtol=1e-10, atol=1e-10)


@needs_numba
def test_deform_fast_op_samples_non_finite_offsets_outside_the_image() -> None:
    """The operator itself (no finite_offset): a NaN or infinite offset gives the value and
    gradients of a point far outside, also with a mask."""
    tensors, kw = _deform_problem(DEFORM_CASES[1], n=1)
    x, offset, weight, bias, mask = tensors
    far, bad = offset.clone(), offset.clone()
    far[0, [0, 3, 8], [1, 2, 0], [0, 3, 5]] = -1e4
    bad[0, [0, 3, 8], [1, 2, 0], [0, 3, 5]] = torch.tensor([float("nan"), float("inf"),
                                                            -float("inf")])
    got = _deform_grads(ops.deform_conv2d, (x, bad, weight, bias, mask), kw)
    expected = _deform_grads(ops.deform_conv2d, (x, far, weight, bias, mask), kw)
    _assert_same(got, expected, rtol=0, atol=0)
    assert got[2][0, [0, 3, 8], [1, 2, 0], [0, 3, 5]].eq(0).all()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cls", [bz.DeformConv2d, bz.ModulatedDeformConv2d])
def test_deform_block_deterministic_channels_last_and_empty(fast: bool, cls) -> None:
    block = cls(8, 6, 2, offset_groups=2)
    torch.nn.init.normal_(block.offset_conv.weight, std=0.5)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    with deterministic_algorithms(), ops.fast_ops(fast):
        runs = []
        for _ in range(2):
            y = block(x)
            runs.append((y, *torch.autograd.grad(y.square().sum(), (x, block.weight))))
        cl = block(x.detach().to(memory_format=torch.channels_last))
        sliced = block(torch.cat([x.detach(), x.detach()], dim=-1)[..., ::2])
        empty = block(torch.randn(0, 8, 9, 7))
    _assert_same(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(cl, runs[0][0], **TOL)
    assert sliced.shape == runs[0][0].shape
    assert empty.shape == (0, 6, 5, 4)


@pytest.mark.parametrize("impl", ["fast", "torchvision", "torch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30])
def test_deform_non_finite_offsets_sample_outside_the_image(impl: str, value: float) -> None:
    """A non-finite offset contributes zero with zero gradient, as a point beyond the border."""
    if impl == "fast" and not ops.fast_ops_available():
        pytest.skip("numba is not installed")
    block = bz.ModulatedDeformConv2d(4, 5, impl="auto" if impl == "fast" else impl)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    clean_offset, mask = block.offsets(x)
    bad = clean_offset.detach().clone()
    far = clean_offset.detach().clone()
    bad[0, 6, 2, 3] = value  # tap 3, row offset, output (2, 3)
    far[0, 6, 2, 3] = -1e4
    bad.requires_grad_()
    with ops.fast_ops(impl == "fast"):
        assert implementation(block.impl, x) == impl
        out = _deform_with_offsets(block, x, bad, mask)
        expected = _deform_with_offsets(block, x, far, mask)
    torch.testing.assert_close(out, expected, **TOL)
    out.square().sum().backward()
    assert bad.grad.isfinite().all() and bad.grad[0, 6, 2, 3] == 0
    assert x.grad.isfinite().all()


def _deform_with_offsets(block, x, offset, mask):
    """The block's forward with given offsets (the path it takes for ``x``)."""
    block.offsets = lambda inp: (offset, mask)
    try:
        return block(x)
    finally:
        del block.offsets


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("where", ["input", "mask"])
def test_deform_non_finite_input_or_mask_propagates_without_crashing(fast, where) -> None:
    block = bz.ModulatedDeformConv2d(4, 5)
    x = torch.randn(1, 4, 6, 5)
    offset, mask = block.offsets(x)
    mask = mask.detach().clone()
    if where == "input":
        x[0, 1, 2, 2] = float("nan")
    else:
        mask[0, 4, 1, 1] = float("nan")
    with ops.fast_ops(fast):
        out = _deform_with_offsets(block, x, offset, mask)
    reference = deform_conv2d_torch(x, offset, block.weight, block.bias, padding=1, mask=mask)
    torch.testing.assert_close(out, reference, equal_nan=True, **TOL)
    assert out.isnan().any() and out.isfinite().any()


@needs_numba
@pytest.mark.parametrize("cls", [bz.DeformConv2d, bz.ModulatedDeformConv2d])
def test_deform_flop_count_is_the_same_on_the_fast_operator(cls) -> None:
    """The matrix product inside the custom op is invisible to FlopCounterMode: declared."""
    from blockzoo.core import count_flops

    fast, pure = cls(16, 32, stride=2).eval(), cls(16, 32, stride=2, impl="torch").eval()
    pure.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad(), ops.fast_ops(True):
        assert implementation(fast.impl, x) == "fast"
        assert count_flops(fast, x) == count_flops(pure, x)


def _compile_and_compare(block: torch.nn.Module, x: torch.Tensor, **grad_tol: float) -> list[str]:
    """Compile ``block`` with ``fullgraph=True``, check output and input gradient against eager,
    and return the targets of the captured graph's nodes."""
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, block(x), **TOL)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (expected,) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, **(grad_tol or TOL))
    return seen


@needs_numba
def test_deform_block_compiles_to_one_op_and_matches_eager() -> None:
    block = bz.ModulatedDeformConv2d(4, 6, 2)
    torch.nn.init.normal_(block.offset_conv.weight, std=0.5)
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    seen = _compile_and_compare(block, x, rtol=1e-4, atol=1e-5)
    assert any("deform_conv2d" in target for target in seen)


# ---------------------------------------------------------------------------------------------
# ACmix window attention


def _attention_operands(b=4, d=8, h=9, w=7, dtype=torch.float32):
    tensors = [torch.randn(b, d, h, w, dtype=dtype) for _ in range(3)]
    tensors.append(torch.randn(1, d, h, w, dtype=dtype))
    return tuple(t.requires_grad_() for t in tensors)


@needs_numba
@pytest.mark.parametrize(("size", "dilation", "stride", "h", "w"),
                         [(7, 1, 1, 9, 8), (7, 1, 2, 9, 7), (3, 2, 1, 6, 5), (3, 1, 2, 1, 1),
                          (7, 1, 1, 2, 3)])
def test_window_attention_fast_equals_fallback_and_unfold(size, dilation, stride, h, w) -> None:
    inputs = _attention_operands(h=h, w=w)
    grad = torch.randn(4, 8, -(-h // stride), -(-w // stride))

    def op(*args):
        return local_window_attention(*args, size, dilation, stride)

    fast = _grads(op, inputs, grad)
    with ops.fast_ops(False):
        fallback = _grads(op, inputs, grad)
    unfold = _grads(lambda *a: acmix_attention_unfold_reference(*a, size, dilation, stride),
                    inputs, grad)
    _assert_same(fast, fallback)
    _assert_same(fast, unfold)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(("size", "dilation", "stride"), [(3, 1, 2), (3, 2, 1)])
def test_window_attention_gradcheck_float64(fast, size, dilation, stride) -> None:
    inputs = _attention_operands(2, 3, 5, 4, torch.float64)
    with ops.fast_ops(fast):
        assert torch.autograd.gradcheck(
            lambda *a: local_window_attention(*a, size, dilation, stride), inputs
        )


@needs_numba
def test_window_attention_opcheck() -> None:
    qkv = torch.randn(2, 3, 3, 2, 5, 4, requires_grad=True)  # (B, D, q/k/v, heads, H, W)
    pe = torch.randn(3, 5, 4, requires_grad=True)
    torch.library.opcheck(ops.window_attention, (qkv, pe, 3, 1, 1, 0.5))
    torch.library.opcheck(ops.window_attention, (qkv, pe, 3, 1, 2, 0.5))
    torch.library.opcheck(ops.window_attention, (qkv, pe, 5, 2, 1, 1.0))
    out = torch.randn(2, 6, 3, 2)
    torch.library.opcheck(ops.window_attention_add_,
                          (out, torch.ones(1), qkv.detach(), pe.detach(), 3, 1, 2, 0.5))
    x, weight = torch.randn(2, 6, 5, 4, requires_grad=True), torch.randn(4, 3, 3, 3)
    torch.library.opcheck(ops.grouped_conv2d, (x, weight.requires_grad_(), 2, 1, 2))


GROUPED_CASES = [  # (N, groups, channels in, out per group, H, W, K)
    (2, 16, 12, 4, 9, 8, 3),  # ACmix's default grouping: quads of output channels
    (1, 3, 5, 6, 7, 11, 3),  # a quad and a pair per group, odd, non-square map
    (2, 2, 4, 3, 10, 3, 3),  # a pair and a single; map narrower than the rows are long
    (2, 4, 3, 1, 6, 5, 3),  # single output channels
    (1, 1, 8, 8, 1, 1, 3),  # one pixel
    (2, 2, 3, 2, 2, 3, 5),  # map smaller than the kernel
    (1, 3, 2, 2, 13, 6, 7),
    (3, 5, 2, 3, 4, 4, 1),
    (0, 2, 3, 2, 5, 4, 3),  # empty batch
    (1, 2, 3, 4, 40, 70, 3),  # several blocks of rows
    (5, 2, 3, 4, 20, 20, 3),  # whole planes of several samples per job, and a remainder
    (2, 1, 2, 2, 45, 50, 5),
]


@needs_numba
@pytest.mark.parametrize(("n", "groups", "cin", "og", "h", "w", "k"), GROUPED_CASES)
def test_grouped_conv2d_kernel_matches_a_float64_conv(n, groups, cin, og, h, w, k) -> None:
    """The compiled forward (stride 1, padding (K - 1) / 2) against ``F.conv2d`` in float64:
    1e-5 in float32, 1e-12 in float64, also on channels_last and non-contiguous inputs."""
    x64 = torch.randn(n, groups * cin, h, w, dtype=torch.float64)
    w64 = torch.randn(groups * og, cin, k, k, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x64, w64, None, 1, k // 2, 1, groups)
    for dtype, tol in ((torch.float64, {"rtol": 1e-12, "atol": 1e-12}), (torch.float32, TOL)):
        x, weight = x64.to(dtype), w64.to(dtype)
        variants = (x, x.to(memory_format=torch.channels_last),
                    x.transpose(2, 3).contiguous().transpose(2, 3))
        for xv in variants:
            with torch.profiler.profile() as prof:
                out = ops.grouped_conv2d(xv, weight, 1, k // 2, groups)
            assert out.is_contiguous() and out.dtype == dtype
            torch.testing.assert_close(out.double(), expected, **tol)
        # the kernel ran, not F.conv2d
        names = {event.name for event in prof.events()}
        assert not any("convolution" in name for name in names), names


@needs_numba
def test_grouped_conv2d_kernel_is_deterministic_and_falls_back_elsewhere() -> None:
    """Bitwise equal twice (1 and 2 threads); NaN and infinities where ``F.conv2d`` has them;
    stride 2, other paddings, even kernels and bfloat16 run ``F.conv2d`` with its results;
    wrong shapes raise as ``F.conv2d`` does."""
    x, weight = torch.randn(2, 24, 17, 15), torch.randn(8, 12, 3, 3)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            runs.append(ops.grouped_conv2d(x, weight, 1, 1, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    conv = torch.nn.functional.conv2d
    bad = x.clone()  # non-finite values on the borders reach only their neighbours
    inf = float("inf")
    bad[0, 3, 0, 14], bad[1, 13, 16, 0], bad[1, 20, 8, 7] = float("nan"), inf, -inf
    torch.testing.assert_close(ops.grouped_conv2d(bad, weight, 1, 1, 2),
                               conv(bad, weight, None, 1, 1, 1, 2), equal_nan=True, **TOL)
    for stride, padding, w in ((2, 1, weight), (1, 0, weight), (1, 2, weight),
                               (1, 1, torch.randn(8, 12, 4, 4)), (2, 1, torch.randn(8, 12, 1, 1))):
        out = ops.grouped_conv2d(x, w, stride, padding, 2)
        torch.testing.assert_close(out, conv(x, w, None, stride, padding, 1, 2), rtol=0, atol=0)
        assert out.is_contiguous()
    half = ops.grouped_conv2d(x.bfloat16(), weight.bfloat16(), 1, 1, 2)
    torch.testing.assert_close(half, conv(x.bfloat16(), weight.bfloat16(), None, 1, 1, 1, 2))
    with pytest.raises(RuntimeError):
        ops.grouped_conv2d(x, torch.randn(8, 5, 3, 3), 1, 1, 2)


@needs_numba
def test_grouped_conv2d_gradcheck_opcheck_and_compile() -> None:
    """float64 gradcheck through the compiled forward, ``opcheck`` at stride 1 (the kernel)
    and 2 (``F.conv2d``), and one operator under ``torch.compile(fullgraph=True)``."""
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_conv2d(a, b, 1, 1, 2), (x, weight))
    for stride in (1, 2):
        torch.library.opcheck(ops.grouped_conv2d, (x.float(), weight.float(), stride, 1, 2))
        torch.library.opcheck(ops.grouped_conv2d, (x, weight, stride, 1, 2))
    torch._dynamo.reset()
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda a, b: ops.grouped_conv2d(a, b, 1, 1, 2), backend=backend,
                       fullgraph=True)
    torch.testing.assert_close(fn(x, weight), ops.grouped_conv2d(x, weight, 1, 1, 2))
    assert seen == ["blockzoo.grouped_conv2d.default"], seen


def _heads_reference(qkv: torch.Tensor, pe: torch.Tensor, size: int, dilation: int, stride: int,
                     scale: float) -> torch.Tensor:
    """``window_attention`` through the unfold reference: ``(B, heads, D, Ho, Wo)``."""
    n, d, _, heads, h, w = qkv.shape
    q, k, v = (qkv[:, :, i].transpose(1, 2).reshape(n * heads, d, h, w) for i in range(3))
    out = acmix_attention_unfold_reference(q * scale, k, v, pe[None], size, dilation, stride)
    return out.reshape(n, heads, d, *out.shape[-2:])


@needs_numba
@pytest.mark.parametrize(
    ("d", "h", "w", "size", "dilation", "stride"),
    [(16, 9, 8, 7, 1, 1),  # eight-channel groups
     (12, 30, 9, 7, 1, 1),  # a remainder of channels; several row blocks of each parity
     (5, 33, 9, 3, 1, 2),  # stride 2, several blocks
     (8, 6, 5, 3, 2, 1),  # dilation
     (3, 2, 3, 7, 1, 1),  # window larger than the map: iterated reflection
     (4, 1, 1, 3, 1, 2)],  # one pixel
)
def test_window_attention_op_matches_a_float64_reference(d, h, w, size, dilation, stride) -> None:
    """The operator (q, k, v read from the fused projection layout, scaling, position encoding
    and reflection padding inside) against the unfold reference in float64: output and the
    gradients to ``qkv`` and ``pe``, in float32 and float64."""
    qkv64 = torch.randn(2, d, 3, 2, h, w, dtype=torch.float64)
    pe64 = torch.randn(d, h, w, dtype=torch.float64)
    grad64 = torch.randn(2, 2, d, -(-h // stride), -(-w // stride), dtype=torch.float64)
    inputs = (qkv64.requires_grad_(), pe64.requires_grad_())
    expected = _grads(lambda a, b: _heads_reference(a, b, size, dilation, stride, 0.3), inputs,
                      grad64)
    for dtype, tol in ((torch.float64, {"rtol": 1e-10, "atol": 1e-10}), (torch.float32, TOL)):
        cast = tuple(t.detach().to(dtype).requires_grad_() for t in inputs)
        fast = _grads(lambda a, b: ops.window_attention(a, b, size, dilation, stride, 0.3), cast,
                      grad64.to(dtype))
        _assert_same([t.double() for t in fast], expected, **tol)


@needs_numba
@pytest.mark.parametrize(("dtype", "ulps"), [(torch.float32, 1.0), (torch.float64, 64.0)])
def test_window_attention_exponential_is_accurate_and_keeps_non_finite(dtype, ulps) -> None:
    """The kernels' exponential (8 Taylor terms in float32, 12 in float64) against exp in
    float64 over the whole argument range of the softmax, ``[-125 ln 2, 0]``: within one ulp of
    the exact value in float32 (64 in float64); 0 below that range and for ``-inf``, NaN for
    NaN."""
    import numba
    import numpy as np

    from blockzoo.ops.acmix import _exp, _exp_constants, _exp_terms

    @numba.njit
    def exps(x, consts, out):
        terms = _exp_terms(consts)
        for i in range(x.shape[0]):
            out[i] = _exp(x[i], terms)

    lowest = -125 * math.log(2)
    grid = torch.cat([-torch.logspace(-9, math.log10(-lowest), 100001, dtype=torch.float64),
                      torch.linspace(lowest, 0, 100001, dtype=torch.float64)]).to(dtype)
    grid = grid[grid >= lowest]
    got = torch.empty_like(grid)
    exps(grid.numpy(), _exp_constants(dtype), got.numpy())
    exact = grid.double().exp()
    ulp = torch.from_numpy(np.spacing(exact.to(dtype).numpy())).double()
    assert ((got.double() - exact).abs() / ulp).max() <= ulps
    special = torch.tensor([0.0, -0.0, lowest * 1.001, -1e4, -math.inf, math.nan], dtype=dtype)
    got = torch.empty_like(special)
    exps(special.numpy(), _exp_constants(dtype), got.numpy())
    torch.testing.assert_close(got, torch.tensor([1.0, 1, 0, 0, 0, math.nan], dtype=dtype),
                               rtol=0, atol=0, equal_nan=True)


@needs_numba
@pytest.mark.parametrize(("d", "h", "w"), [(16, 45, 30), (12, 9, 8), (3, 20, 11), (9, 2, 3)])
def test_window_attention_rows_of_seven_equal_the_general_sweeps(d, h, w, monkeypatch) -> None:
    """The forward pass's 7 x 7 path (rows of seven taps, eight channels at a time and one by
    one for the rest; several blocks per job) against the general sweeps, in float32 (1e-5)
    and float64 (1e-12), written out and added in place; bitwise the same for any number of
    blocks per job and threads, so for any thread count."""
    from blockzoo.ops import acmix as acmix_ops

    def forward(qkv, pe, rows_of_seven, rate=None):
        out = torch.zeros(qkv.shape[0], qkv.shape[3], d, h, w, dtype=qkv.dtype)
        acmix_ops._run_forward(qkv, pe, 7, 1, 1, 0.3, out, rate, rows_of_seven)
        return out

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        qkv = torch.randn(3, d, 3, 2, h, w, dtype=dtype)
        pe = torch.randn(d, h, w, dtype=dtype)
        rate = torch.full((1,), 0.7, dtype=dtype)
        expected = forward(qkv, pe, False)
        got = forward(qkv, pe, True)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(forward(qkv, pe, True, rate), 0.7 * expected, rtol=tol,
                                   atol=tol)
        torch.testing.assert_close(ops.window_attention(qkv, pe, 7, 1, 1, 0.3), got, rtol=0,
                                   atol=0)
        runs, previous = [], torch.get_num_threads()
        try:
            for blocks, jobs, threads in ((1, 8, 1), (4, 1, 1), (4, 1, 2), (2, 1, 2)):
                monkeypatch.setattr(acmix_ops, "_CHUNK_BLOCKS", blocks)
                monkeypatch.setattr(acmix_ops, "_JOBS_PER_THREAD", jobs)
                torch.set_num_threads(threads)
                runs.append(forward(qkv, pe, True))
        finally:
            torch.set_num_threads(previous)
        for run in runs:
            torch.testing.assert_close(run, got, rtol=0, atol=0)


@needs_numba
def test_window_attention_on_maps_wider_than_a_block_row() -> None:
    """A map wider than the forward pass's rows of ``_PITCH`` values takes the general sweeps:
    the same result as the reference."""
    from blockzoo.ops.acmix import _PITCH

    qkv = torch.randn(1, 2, 3, 1, 3, _PITCH, dtype=torch.float64)
    pe = torch.randn(2, 3, _PITCH, dtype=torch.float64)
    torch.testing.assert_close(ops.window_attention(qkv, pe, 7, 1, 1, 0.3),
                               _heads_reference(qkv, pe, 7, 1, 1, 0.3), rtol=1e-10, atol=1e-10)


@needs_numba
def test_window_attention_non_finite_inputs_spread_as_in_the_softmax() -> None:
    """NaN and infinite scores or values give NaN exactly where the reference (torch's softmax)
    does, in float32 on the 7 x 7 path and on the general sweeps (5 x 5)."""
    for size in (7, 5):
        qkv = torch.randn(2, 8, 3, 2, 12, 10)
        qkv[0, 1, 0, 0, 3, 4] = math.nan  # one query: its output pixel
        qkv[0, 2, 1, 1, 6, 6] = math.inf  # one key: the windows that hold it
        qkv[1, 3, 2, 0, 5, 2] = -math.inf  # one value
        qkv[1, 0, 0, 1, 8, 8] = 1e30  # a score of +-inf from a finite query
        pe = torch.randn(8, 12, 10)
        got = ops.window_attention(qkv, pe, size, 1, 1, 0.3)
        expected = _heads_reference(qkv.double(), pe.double(), size, 1, 1, 0.3).float()
        assert got.isnan().any() and got.isfinite().any()
        torch.testing.assert_close(got, expected, equal_nan=True, **TOL)


@needs_numba
def test_window_attention_op_gradcheck_float64() -> None:
    for size, dilation, stride in ((3, 1, 2), (3, 2, 1), (5, 1, 1)):
        qkv = torch.randn(1, 3, 3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
        pe = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, s=size, dl=dilation, st=stride: ops.window_attention(a, b, s, dl, st,
                                                                              0.5),
            (qkv, pe),
        )


@needs_numba
@pytest.mark.parametrize(("stride", "kwargs"), [(1, {}), (2, {}),
                                                (2, {"head": 2, "kernel_att": 5, "dilation": 2,
                                                     "kernel_conv": 5})])
def test_acmix_fused_block_equals_the_reference_path(stride, kwargs) -> None:
    """The block on the fused path (one q/k/v projection, ``fc`` folded into ``dep_conv``, the
    attention operator) against its PyTorch form: float64 to 1e-10 for the output and the
    gradients of the input and every parameter; float32 output and input gradient to 1e-5."""
    block = bz.ACmix(8, 16, stride, **kwargs).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # rates and shift kernels off their init
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64, requires_grad=True)
    inputs = (x, *block.parameters())
    grad = torch.randn(2, 16, -(-11 // stride), -(-9 // stride), dtype=torch.float64)
    fast = _grads(lambda *_: block(x), inputs, grad)
    with ops.fast_ops(False):
        reference = _grads(lambda *_: block(x), inputs, grad)
    _assert_same(fast, reference, rtol=1e-10, atol=1e-10)
    block.float()
    x32 = x.detach().float().requires_grad_()
    fast32 = _grads(block, (x32,), grad.float())
    _assert_same(fast32, [t.float() for t in reference[:2]])


@needs_numba
def test_acmix_inference_adds_the_attention_in_place() -> None:
    """Without autograd the attention operator adds ``rate1 * attention`` into the conv path's
    output (``window_attention_add_``), with the reference result, eagerly and compiled."""
    block = bz.ACmix(16, 16).eval()
    with torch.no_grad():
        block.rate1.fill_(0.7)
        x = torch.randn(2, 16, 9, 7)
        with torch.profiler.profile() as prof:
            y = block(x)
        names = {event.name for event in prof.events()}
        assert "blockzoo::window_attention_add_" in names
        assert "blockzoo::window_attention" not in names
        with ops.fast_ops(False):
            expected = block(x)
        torch.testing.assert_close(y, expected, **TOL)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, **TOL)
    y = block(x.requires_grad_())  # with autograd: the out-of-place operator
    torch.testing.assert_close(y, expected, **TOL)
    y.sum().backward()
    assert block.rate1.grad is not None


@needs_numba
def test_acmix_hooked_or_replaced_sub_modules_run_as_themselves() -> None:
    """The fused path computes from the sub-convs' parameters; a hook on any of them, a global
    module hook or a replaced sub-module makes the block call every module as itself."""
    block = bz.ACmix(8, 8)
    x = torch.randn(2, 8, 7, 6)
    with ops.fast_ops(False):
        expected = block(x)

    def fused() -> bool:  # the fused path's conv-path operator ran
        with torch.profiler.profile() as prof:
            torch.testing.assert_close(block(x), expected, **TOL)
        return any("grouped_conv2d" in event.name for event in prof.events())

    assert fused()
    names = ("conv1", "conv2", "conv3", "conv_p", "fc", "dep_conv")
    calls: list[str] = []
    for name in names:
        handle = block.get_submodule(name).register_forward_hook(
            lambda *args, name=name: calls.append(name))
        assert not fused()
        handle.remove()
    assert calls == list(names)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fused()
    finally:
        handle.remove()
    block.fc = torch.nn.Sequential(block.fc)  # a wrapper, as surgery makes
    assert not fused()


@pytest.mark.parametrize("fast", [True, False])
def test_acmix_deterministic_channels_last_non_finite_and_empty(fast: bool) -> None:
    block = bz.ACmix(16, 16)
    x = torch.randn(2, 16, 9, 7, requires_grad=True)
    with deterministic_algorithms(), ops.fast_ops(fast):
        runs = []
        for _ in range(2):
            y = block(x)
            runs.append((y, *torch.autograd.grad(y.square().sum(), (x, block.conv1.weight))))
        cl = block(x.detach().to(memory_format=torch.channels_last))
        bad = x.detach().clone()
        bad[0, 3, 4, 4] = float("nan")
        bad[1, 2, 0, 0] = float("inf")
        non_finite = block(bad)
        empty_inputs = _attention_operands(0, 4, 5, 3)
        empty = local_window_attention(*empty_inputs, 3, 1, 2)
        empty.sum().backward()
    _assert_same(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(cl, runs[0][0], **TOL)
    assert empty.shape == (0, 4, 3, 2)
    assert all(t.grad is not None and t.grad.shape == t.shape for t in empty_inputs)
    assert non_finite.isnan().any() and non_finite.isfinite().any()
    with ops.fast_ops(not fast):
        other = block(bad)
    torch.testing.assert_close(non_finite, other, equal_nan=True, **TOL)


@needs_numba
def test_acmix_compiles_to_one_attention_op_and_matches_eager() -> None:
    block = bz.ACmix(8, 8)
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    seen = _compile_and_compare(block, x)
    assert any("window_attention" in target for target in seen)


# ---------------------------------------------------------------------------------------------
# switching, reporting, and the contract suite over the fallback

FAST_BLOCKS = ["involution", "acmix", "deform_conv", "mdeform_conv"]


def test_use_fast_path_rules() -> None:
    x = torch.randn(1, 2, 3, 3)
    with ops.fast_ops(True):
        assert ops.use_fast_path(x) == ops.fast_ops_available()
        assert not ops.use_fast_path(x.half()) and not ops.use_fast_path(x.bfloat16())
        assert not ops.use_fast_path(x, x.double())  # mixed dtypes
        assert not ops.use_fast_path(x.to("meta"))
    with ops.fast_ops(False):
        assert not ops.use_fast_path(x) and not ops.fast_ops_enabled()
        assert "reference" in ops.path_description()


def test_environment_variable_disables_the_fast_path() -> None:
    code = "import blockzoo.ops as o; print(o.fast_ops_enabled(), o.path_description())"
    env = {**os.environ, ops.ENV_DISABLE: "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.startswith("False") and ops.ENV_DISABLE in result.stdout


def test_without_numba_the_blocks_run_their_pytorch_forms() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"  # as if the extra were not installed
        "import torch, blockzoo as bz\n"
        "from blockzoo import ops\n"
        "assert not ops.fast_ops_available() and not ops.use_fast_path(torch.ones(1))\n"
        "for name in ('involution', 'acmix', 'deform_conv', 'mdeform_conv'):\n"
        "    x = torch.randn(2, 16, 9, 7, requires_grad=True)\n"
        "    bz.create_block(name, 16)(x).sum().backward()\n"
        "    assert x.grad.isfinite().all()\n"
        "print(ops.path_description())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "install blockzoo[fast]" in result.stdout


@needs_numba
def test_kernels_keep_torch_thread_count() -> None:
    """Numba's OpenMP pool sets the shared OpenMP thread count when it starts; torch's is kept."""
    code = ("import torch; torch.set_num_threads(1); from blockzoo.blocks.involution import "
            "involution2d; involution2d(torch.ones(1, 4, 5, 5), torch.ones(1, 1, 3, 3, 5, 5)); "
            "print(torch.get_num_threads())")
    env = {key: value for key, value in os.environ.items() if key != ops.ENV_DISABLE}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.strip() == "1"


@needs_numba
def test_kernel_threads_keeps_torch_thread_count_inside() -> None:
    """Also inside ``kernel_threads`` on its first use (torch's own products there, and the
    deformable tile size, follow ``torch.set_num_threads``)."""
    code = ("import torch; torch.set_num_threads(1); from blockzoo.ops._backend import "
            "kernel_threads\nwith kernel_threads(): print(torch.get_num_threads())")
    env = {key: value for key, value in os.environ.items() if key != ops.ENV_DISABLE}
    env["NUMBA_NUM_THREADS"] = "2"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.strip() == "1"


@needs_numba
@pytest.mark.parametrize("policy", [None, "active"])
def test_kernel_thread_pool_start_leaves_the_wait_policy_as_it_was(policy) -> None:
    """Numba's OpenMP runtime starts with ``OMP_WAIT_POLICY=passive`` set only while it loads
    (idle workers sleep instead of spinning); a policy the user set is kept and used."""
    code = ("import os, torch; from blockzoo.blocks.involution import involution2d; "
            "out = involution2d(torch.ones(1, 4, 5, 5), torch.ones(1, 1, 3, 3, 5, 5)); "
            "print(os.environ.get('OMP_WAIT_POLICY'), float(out.sum()))")
    env = {key: value for key, value in os.environ.items()
           if key not in (ops.ENV_DISABLE, "OMP_WAIT_POLICY")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    # each of the 4 channels: (2 + 3 + 3 + 3 + 2) ** 2 products of ones inside the map
    assert result.stdout.split() == [str(policy), str(float(4 * 13**2))]


def _forked_child(queue) -> None:
    x, kernel = torch.ones(1, 4, 5, 5), torch.ones(1, 1, 3, 3, 5, 5)
    queue.put(float(involution2d(x, kernel).sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_after_the_kernels_ran_still_computes() -> None:
    """GNU OpenMP terminates a forked child that enters a parallel region: it takes the
    reference forms instead (same result)."""
    import multiprocessing

    x, kernel = torch.ones(1, 4, 5, 5), torch.ones(1, 1, 3, 3, 5, 5)
    expected = float(involution2d(x, kernel).sum())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert queue.get(timeout=10) == expected


@pytest.mark.parametrize("name", FAST_BLOCKS)
def test_cli_info_names_the_active_path(name: str, capsys) -> None:
    from blockzoo.cli import main

    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert "implementation:" in out
    assert ("compiled CPU kernels" in out) == ops.fast_ops_enabled()


CONTRACT_CHECKS = [
    test_contract.test_backward_reaches_every_parameter,
    test_contract.test_gradcheck_float64,
    test_contract.test_channels_last_and_non_contiguous_inputs,
    test_contract.test_deterministic_algorithms,
    pytest.param(test_contract.test_torch_compile_fullgraph_matches_eager,
                 marks=pytest.mark.compile),
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS,
                         ids=lambda check: getattr(check, "__name__", "check")[5:])
@pytest.mark.parametrize("name", FAST_BLOCKS)
def test_contract_checks_on_the_fallback(name: str, check) -> None:
    with ops.fast_ops(False):
        check(name)


@needs_numba
@pytest.mark.parametrize("value", [0.0, -1.0, 1.0, 2.0])
def test_deform_fast_op_gradients_at_integer_points_follow_torchvision(value: float) -> None:
    """At a whole-pixel sampling point (every point of a fresh block, whose offsets start at
    zero; the padding row at -1 included) bilinear sampling has a kink: the gradients to offsets
    and mask are torchvision's one-sided ones, not zero."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.full((2, 18, 6, 5), value, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 9, 6, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    expected = tv_deform_conv2d(x, offset, weight, padding=1, mask=mask)
    expected_grads = torch.autograd.grad((expected * grad).sum(), (offset, mask))
    out = ops.deform_conv2d(x, offset, weight, None, padding=(1, 1), mask=mask)
    grads = torch.autograd.grad((out * grad).sum(), (offset, mask))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want)


@needs_numba
@pytest.mark.parametrize("name", ["deform_conv", "mdeform_conv"])
def test_fresh_deform_block_gradients_equal_the_reference_path(name: str) -> None:
    torch.manual_seed(0)
    block = bz.create_block(name, 8, dtype=torch.float64)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    grads = {}
    for enabled in (True, False):
        block.zero_grad()
        with ops.fast_ops(enabled):
            block(x).square().sum().backward()
        grads[enabled] = {n: p.grad.clone() for n, p in block.named_parameters()}
    for pname, got in grads[True].items():
        torch.testing.assert_close(got, grads[False][pname], msg=pname)


@needs_numba
@pytest.mark.parametrize(("name", "where"), [("involution", "span"), ("involution", "reduce"),
                                             ("acmix", "dep_conv"), ("acmix", "conv1")])
def test_fast_paths_keep_backward_hooks_of_their_sub_modules(name: str, where: str) -> None:
    """A full backward hook fires only when its module is called: the fast paths then call it."""
    block = bz.create_block(name, 16).train()
    fired: list[str] = []
    block.get_submodule(where).register_full_backward_hook(lambda *args: fired.append(where))
    x = torch.randn(2, 16, 9, 7, requires_grad=True)
    with ops.fast_ops(True):
        block(x).square().sum().backward()
    assert fired == [where]
