"""Semantics of deformable convolution v1/v2 beyond the contract.

The plain-PyTorch implementation is checked against ``torchvision.ops.deform_conv2d`` (values and
gradients, offsets reaching outside the image), the blocks' offset predictors and fresh-block
facts, the layout of offsets and masks, and which implementation ``impl="auto"`` runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim
from torchvision.ops import deform_conv2d

import blockzoo as bz
from blockzoo import ops
from blockzoo.blocks.deform import deform_conv2d_torch, implementation, uses_torchvision

from .contract import deterministic_algorithms

# (C_in, C_out, H, W, kernel, stride, padding, dilation, groups, offset_groups, with mask)
CASES = [
    (4, 6, 7, 6, 3, 1, 1, 1, 1, 1, False),
    (4, 6, 7, 6, 3, 1, 1, 1, 1, 1, True),
    (8, 4, 9, 5, 3, 2, 2, 2, 2, 2, True),
    (6, 6, 4, 5, 5, 1, 2, 1, 3, 3, False),
    (6, 9, 5, 5, 3, 2, 0, 1, 3, 2, True),
    (4, 4, 1, 1, 3, 1, 1, 1, 1, 1, True),
    (4, 2, 6, 3, 1, 1, 0, 1, 2, 4, True),
]


def _random_problem(case, dtype=torch.float64, scale=3.0):
    c_in, c_out, h, w, k, s, p, d, g, og, with_mask = case
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    x = torch.randn(2, c_in, h, w, dtype=dtype)
    weight = torch.randn(c_out, c_in // g, k, k, dtype=dtype)
    bias = torch.randn(c_out, dtype=dtype)
    offset = torch.randn(2, 2 * og * k * k, ho, wo, dtype=dtype) * scale
    mask = torch.rand(2, og * k * k, ho, wo, dtype=dtype) if with_mask else None
    kwargs = dict(stride=(s, s), padding=(p, p), dilation=(d, d))
    return x, offset, weight, bias, mask, kwargs


def _sample_positions(offset, k, s, p, d):
    """Row coordinates sampled by every tap (for checking that some fall outside the image)."""
    n, _, ho, wo = offset.shape
    dy = offset.reshape(n, -1, k * k, 2, ho, wo)[:, :, :, 0]
    rows = (torch.arange(k).repeat_interleave(k) * d)[:, None, None]
    return rows + (torch.arange(ho) * s - p)[None, :, None] + dy


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_impl_matches_torchvision_on_random_offsets(case, dtype) -> None:
    x, offset, weight, bias, mask, kw = _random_problem(case, dtype)
    k, s, p, d = case[4:8]
    ys = _sample_positions(offset, k, s, p, d)
    if x.shape[2] > 1:
        assert ((ys <= -1) | (ys >= x.shape[2])).any(), "no sample lies outside the image"
        assert ((ys > -1) & (ys < 0)).any() or ((ys > x.shape[2] - 1) & (ys < x.shape[2])).any()
    expected = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    got = deform_conv2d_torch(x, offset, weight, bias, mask=mask, **kw)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # without bias as well
    torch.testing.assert_close(
        deform_conv2d_torch(x, offset, weight, None, mask=mask, **kw),
        deform_conv2d(x, offset, weight, None, mask=mask, **kw),
        rtol=1e-5, atol=1e-5,
    )


def test_samples_far_outside_the_image_are_zero() -> None:
    x, offset, weight, _, mask, kw = _random_problem(CASES[1])
    far = torch.full_like(offset, 50.0)
    for op in (deform_conv2d, deform_conv2d_torch):
        assert op(x, far, weight, None, mask=mask, **kw).abs().max() == 0
        assert op(x, -far, weight, None, mask=mask, **kw).abs().max() == 0


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]])
def test_torch_impl_gradients_match_torchvision(case) -> None:
    problem = _random_problem(case)
    x, offset, weight, bias, mask, kw = problem
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask) if t is not None]
    grad_out = None
    grads = []
    for op in (deform_conv2d, deform_conv2d_torch):
        y = op(x, offset, weight, bias, mask=mask, **kw)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        grads.append(torch.autograd.grad(y, leaves, grad_out))
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_impl_gradcheck_float64(with_mask: bool) -> None:
    case = (4, 4, 5, 4, 3, 2, 1, 1, 2, 2, with_mask)
    x, offset, weight, bias, mask, kw = _random_problem(case, scale=1.5)
    inputs = tuple(t.requires_grad_() for t in (x, offset, weight, bias, mask) if t is not None)

    def fn(*args):
        mask_arg = args[4] if with_mask else None
        return deform_conv2d_torch(*args[:4], mask=mask_arg, **kw)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torchvision", "torch"])
@pytest.mark.parametrize(("stride", "dilation", "groups"), [(1, 1, 1), (2, 2, 4), (2, 1, 2)])
def test_fresh_v1_block_is_the_plain_convolution(impl, stride, dilation, groups) -> None:
    block = bz.DeformConv2d(8, 12, stride, dilation=dilation, groups=groups, impl=impl)
    x = torch.randn(2, 8, 9, 6)
    expected = F.conv2d(x, block.weight, block.bias, stride, dilation, dilation, groups)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torchvision", "torch"])
def test_fresh_v2_block_is_half_the_convolution_plus_the_unmodulated_bias(impl) -> None:
    x = torch.randn(2, 8, 7, 5)
    block = bz.ModulatedDeformConv2d(8, 6, 2, offset_groups=2, impl=impl)
    half_conv = 0.5 * F.conv2d(x, block.weight, None, 2, 1)
    # torchvision adds the bias after the mask: y = 0.5 * conv(x, w) + b, not 0.5 * (conv + b)
    torch.testing.assert_close(block(x), half_conv + block.bias[:, None, None])
    assert (block.bias.abs() > 1e-3).any()
    no_bias = bz.ModulatedDeformConv2d(8, 6, 2, offset_groups=2, bias=False, impl=impl)
    torch.testing.assert_close(no_bias(x), 0.5 * F.conv2d(x, no_bias.weight, None, 2, 1))
    assert no_bias.bias is None


@pytest.mark.parametrize(("cls", "factor"), [(bz.DeformConv2d, 2), (bz.ModulatedDeformConv2d, 3)])
def test_offset_predictor_geometry_zero_init_and_parameter_count(cls, factor) -> None:
    block = cls(16, 32, 2, kernel_size=5, dilation=2, groups=4, offset_groups=2)
    conv = block.offset_conv
    assert conv.out_channels == factor * 2 * 25
    assert conv.kernel_size == (5, 5) and conv.stride == (2, 2)
    assert conv.padding == (4, 4) and conv.dilation == (2, 2)
    assert conv.weight.abs().sum() == 0 and conv.bias.abs().sum() == 0
    assert block.weight.shape == (32, 4, 5, 5)
    expected = 32 * 4 * 25 + 32 + (16 * 25 + 1) * factor * 2 * 25
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize("impl", ["torchvision", "torch"])
def test_offset_layout_is_dy_then_dx_per_tap(impl) -> None:
    """A constant ``dy = 1`` on every tap reads one row lower: a conv padded 0 above, 2 below."""
    block = bz.DeformConv2d(4, 5, impl=impl, bias=False)
    x = torch.randn(1, 4, 6, 7)
    with torch.no_grad():
        block.offset_conv.bias[0::2] = 1.0  # channel 2t: dy of tap t
    down = F.pad(x, (1, 1, 0, 2))  # tap i of output row y reads row y - 1 + i + 1
    torch.testing.assert_close(block(x), F.conv2d(down, block.weight))
    with torch.no_grad():
        block.offset_conv.bias.zero_()
        block.offset_conv.bias[1::2] = -1.0  # channel 2t + 1: dx of tap t
    left = F.pad(x, (2, 0, 1, 1))  # tap j of output column c reads column c - 1 + j - 1
    torch.testing.assert_close(block(x), F.conv2d(left, block.weight))


@pytest.mark.parametrize("impl", ["torchvision", "torch"])
def test_v2_mask_layout_one_tap_per_channel(impl) -> None:
    """Mask logits +inf on the centre tap only, -inf elsewhere: a 1x1 conv with the centre."""
    block = bz.ModulatedDeformConv2d(4, 5, offset_groups=1, impl=impl, bias=False)
    with torch.no_grad():
        block.offset_conv.bias[18:] = -1e4  # channels 2 * 9 .. 3 * 9 are the mask logits
        block.offset_conv.bias[18 + 4] = 1e4  # tap 4 = (1, 1), the centre
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(block(x), F.conv2d(x, block.weight[:, :, 1:2, 1:2]))
    info = block.explain(x)
    assert info["offset"].shape == (2, 18, 5, 6) and info["mask"].shape == (2, 9, 5, 6)
    torch.testing.assert_close(info["mask"][:, 4], torch.ones(2, 5, 6))


def test_explain_returns_offsets_and_v2_mask() -> None:
    x = torch.randn(2, 8, 9, 7)
    v1 = bz.DeformConv2d(8, stride=2, offset_groups=2)
    v2 = bz.ModulatedDeformConv2d(8, stride=2, offset_groups=2)
    for block in (v1, v2):
        torch.nn.init.normal_(block.offset_conv.weight, std=0.1)
    assert set(v1.explain(x)) == {"offset", "sampling_points"}
    assert v1.explain(x)["offset"].shape == (2, 36, 5, 4)
    info = v2.explain(x)
    assert info["offset"].shape == (2, 36, 5, 4) and info["mask"].shape == (2, 18, 5, 4)
    assert ((info["mask"] > 0) & (info["mask"] < 1)).all()
    raw = v2.offset_conv(x)
    torch.testing.assert_close(info["offset"], raw[:, :36])
    torch.testing.assert_close(info["mask"], torch.sigmoid(raw[:, 36:]))


@pytest.mark.parametrize("cls", [bz.DeformConv2d, bz.ModulatedDeformConv2d])
def test_trained_block_impls_agree(cls) -> None:
    x = torch.randn(2, 8, 9, 7)
    block = cls(8, 12, 2, offset_groups=2, groups=2)
    torch.nn.init.normal_(block.offset_conv.weight, std=0.5)
    torch.nn.init.normal_(block.offset_conv.bias, std=2.0)
    tv = block(x)
    block.impl = "torch"
    torch.testing.assert_close(block(x), tv, rtol=1e-5, atol=1e-5)


def test_auto_impl_choice() -> None:
    x = torch.randn(1, 2, 3, 3)
    with ops.fast_ops(True):
        fast = "fast" if ops.fast_ops_available() else "torchvision"
        assert implementation("auto", x) == fast
        assert implementation("auto", x.double()) == fast
        assert implementation("auto", x.half()) == "torchvision"
        assert implementation("torchvision", x) == "torchvision"
    with ops.fast_ops(False):
        _check_auto_without_fast_ops(x)


def _check_auto_without_fast_ops(x: torch.Tensor) -> None:
    assert uses_torchvision("auto", x)
    assert not uses_torchvision("auto", x.bfloat16())  # torchvision has no bfloat16 kernel
    assert uses_torchvision("torchvision", x.bfloat16()) and not uses_torchvision("torch", x)
    with deterministic_algorithms():
        assert uses_torchvision("auto", x)  # the CPU backward is deterministic
        assert not uses_torchvision("auto", x.to("meta"))  # non-CPU: torchvision uses atomicAdd


def test_torchvision_cpu_backward_is_deterministic_and_rejects_bfloat16() -> None:
    x, offset, weight, bias, mask, kw = _random_problem(CASES[2], torch.float32)
    with deterministic_algorithms():
        grads = []
        for _ in range(2):
            leaves = [t.detach().requires_grad_() for t in (x, offset, weight, mask)]
            y = deform_conv2d(leaves[0], leaves[1], leaves[2], bias, mask=leaves[3], **kw)
            grads.append(torch.autograd.grad(y.square().sum(), leaves))
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="BFloat16"):
        deform_conv2d(x.bfloat16(), offset.bfloat16(), weight.bfloat16(), **kw)


@pytest.mark.parametrize("cls", [bz.DeformConv2d, bz.ModulatedDeformConv2d])
def test_bfloat16_block_runs_through_the_torch_impl(cls) -> None:
    block = cls(8, 8, 2)
    torch.nn.init.normal_(block.offset_conv.weight, std=0.2)
    x = torch.randn(2, 8, 9, 7)
    expected = block(x)
    y = block.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    error = (y.float() - expected).norm() / expected.norm()
    assert error < 2e-2


def test_compile_fullgraph_with_the_torchvision_op_forward_and_backward() -> None:
    block = bz.ModulatedDeformConv2d(4, 6, 2, impl="torchvision")
    torch.nn.init.normal_(block.offset_conv.weight, std=0.5)
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (expected,) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_auto_with_random_offsets(tmp_path) -> None:
    """``impl="auto"`` exports through the torch implementation; offsets reach outside."""
    ort = pytest.importorskip("onnxruntime")
    block = bz.ModulatedDeformConv2d(4, 6, 2, offset_groups=2).eval()
    torch.nn.init.normal_(block.offset_conv.weight, std=0.5)
    torch.nn.init.normal_(block.offset_conv.bias, std=3.0)
    path = tmp_path / "mdcn.onnx"
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}
    torch.onnx.export(
        block, (torch.randn(2, 4, 9, 7),), str(path), input_names=["x"], output_names=["y"],
        opset_version=18, dynamic_shapes={"x": dims},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(3, 4, 12, 5), (1, 4, 1, 1), (1, 4, 6, 10)]:
        x = torch.randn(*shape)
        (y,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, block(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 4},
        {"kernel_size": 0},
        {"groups": 3},
        {"offset_groups": 5},
        {"dilation": 0},
        {"impl": "cuda"},
        {"stride": 3},
    ],
)
def test_rejects_bad_arguments(kwargs) -> None:
    for cls in (bz.DeformConv2d, bz.ModulatedDeformConv2d):
        with pytest.raises(ValueError, match=cls.__name__):
            cls(8, 8, **kwargs)


def test_registry_entries() -> None:
    for name, arxiv in (("deform_conv", "1703.06211"), ("mdeform_conv", "1811.11168")):
        info = bz.block_info(name)
        assert info.kind == "conv" and info.width == "free" and info.strides == (1, 2)
        assert info.arxiv == arxiv
        y = bz.create_block(name, 64)(torch.randn(1, 64, 56, 56))
        assert y.shape == (1, 64, 56, 56)


def test_explain_sampling_points_are_the_grid_plus_offsets() -> None:
    block = bz.DeformConv2d(4, 4, stride=2, kernel_size=3, dilation=2)
    x = torch.randn(1, 4, 7, 6)
    points = block.explain(x)["sampling_points"]  # fresh block: zero offsets
    assert points.shape == (1, 4, 3, 9, 2)
    # output (1, 2), tap (row 2, col 0): y = 1*2 - 2 + 2*2, x = 2*2 - 2 + 0*2
    torch.testing.assert_close(points[0, 1, 2, 6], torch.tensor([4.0, 2.0]))
    torch.nn.init.constant_(block.offset_conv.bias, 0.5)
    shifted = block.explain(x)["sampling_points"]
    torch.testing.assert_close(shifted, points + 0.5)


def test_extra_flops_count_what_the_flop_counter_cannot_see() -> None:
    from blockzoo.core import count_flops

    x = torch.randn(2, 16, 9, 7)
    outputs, taps = 2 * 5 * 4, 9
    conv = 2 * outputs * 32 * 16 * taps
    for cls, per_value in ((bz.DeformConv2d, 4), (bz.ModulatedDeformConv2d, 5)):
        tv = cls(16, 32, stride=2, impl="torchvision").eval()
        pure = cls(16, 32, stride=2, impl="torch").eval()
        pure.load_state_dict(tv.state_dict())
        sampling = 2 * per_value * outputs * 16 * taps
        assert tv.extra_flops(x) == sampling + conv
        assert pure.extra_flops(x) == sampling  # its matmul is counted by FlopCounterMode
        with torch.no_grad():
            offsets = count_flops(tv.offset_conv, x)
            assert count_flops(tv, x) == offsets + sampling + conv
            assert count_flops(pure, x) == offsets + sampling + conv
