"""Semantics of ACmix beyond the contract.

The offset-by-offset attention is checked against the unfold formulation of the reference code,
and the whole block against a line-by-line transcription of the reference forward; then the
initialisation (shift kernels, rates), the padding of inputs smaller than the window, the
validation of ``head`` and the memory the attention keeps for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import blockzoo as bz
from blockzoo.blocks.acmix import (
    acmix_attention_unfold_reference,
    local_window_attention,
    position_grid,
    reflect_indices,
    reflect_pad2d,
    window_attention_weights,
)


def _qkvpe(b, d, h, w, dtype=torch.float64):
    return [torch.randn(b, d, h, w, dtype=dtype) for _ in range(3)] + [
        torch.randn(1, d, h, w, dtype=dtype)
    ]


@pytest.mark.parametrize(
    ("h", "w", "kernel", "dilation", "stride"),
    [(9, 7, 7, 1, 1), (9, 7, 7, 1, 2), (8, 8, 7, 1, 2), (11, 6, 5, 2, 2), (5, 5, 3, 1, 1),
     (13, 10, 3, 3, 1), (2, 3, 7, 1, 1), (1, 1, 7, 1, 2), (3, 1, 5, 1, 2)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offset_loop_attention_equals_the_unfold_reference(h, w, kernel, dilation, stride, dtype):
    q, k, v, pe = _qkvpe(6, 5, h, w, dtype)
    got = local_window_attention(q, k, v, pe, kernel, dilation, stride)
    expected = acmix_attention_unfold_reference(q, k, v, pe, kernel, dilation, stride)
    assert got.shape == (6, 5, -(-h // stride), -(-w // stride))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_gradients_equal_the_unfold_reference() -> None:
    inputs = [t.requires_grad_() for t in _qkvpe(4, 3, 7, 6)]
    grads = []
    for fn in (local_window_attention, acmix_attention_unfold_reference):
        y = fn(*inputs, 5, 1, 2)
        grads.append(torch.autograd.grad(y.sin().sum(), inputs))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def _reference_forward(block: bz.ACmix, x: torch.Tensor) -> torch.Tensor:
    """The reference forward, transcribed: ReflectionPad2d + Unfold, views, official conv path.

    Two fixes to make it run where the reference cannot: ``ceil`` output sizes (the reference
    uses ``h // stride``, which breaks ``view`` for odd sizes) and ``reshape`` for ``view``.
    """
    q, k, v = block.conv1(x), block.conv2(x), block.conv3(x)
    b, c, h, w = q.shape
    head, hd, ka, s = block.head, block.head_dim, block.kernel_att, block.stride
    h_out, w_out = -(-h // s), -(-w // s)
    loc_w = torch.linspace(-1.0, 1.0, w).unsqueeze(0).repeat(h, 1)
    loc_h = torch.linspace(-1.0, 1.0, h).unsqueeze(1).repeat(1, w)
    pe = block.conv_p(torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0))
    q_att = q.reshape(b * head, hd, h, w) * float(hd) ** -0.5
    k_att = k.reshape(b * head, hd, h, w)
    v_att = v.reshape(b * head, hd, h, w)
    q_att, q_pe = q_att[:, :, ::s, ::s], pe[:, :, ::s, ::s]
    pad = nn.ReflectionPad2d((block.dilation * (ka - 1) + 1) // 2)
    unfold = nn.Unfold(kernel_size=ka, padding=0, stride=s)
    unfold_k = unfold(pad(k_att)).reshape(b * head, hd, ka * ka, h_out, w_out)
    unfold_rpe = unfold(pad(pe)).reshape(1, hd, ka * ka, h_out, w_out)
    att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)
    att = att.softmax(dim=1)
    out_att = unfold(pad(v_att)).reshape(b * head, hd, ka * ka, h_out, w_out)
    out_att = (att.unsqueeze(1) * out_att).sum(2).reshape(b, c, h_out, w_out)
    f_all = block.fc(torch.cat([
        q.reshape(b, head, hd, h * w), k.reshape(b, head, hd, h * w), v.reshape(b, head, hd, h * w)
    ], 1))
    f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
    out_conv = block.dep_conv(f_conv)
    return block.rate1 * out_att + block.rate2 * out_conv


@pytest.mark.parametrize(("stride", "size"), [(1, (9, 7)), (2, (9, 7)), (2, (8, 12)), (1, (4, 5))])
def test_block_equals_the_reference_forward(stride, size) -> None:
    block = bz.ACmix(16, 24, stride, head=4)
    with torch.no_grad():  # move every parameter off its initial value
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 16, *size)
    y = block(x)
    assert y.shape == (2, 24, -(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(y, _reference_forward(block, x), rtol=1e-5, atol=1e-5)


def test_reflect_indices_match_reflection_padding_and_iterate_beyond_it() -> None:
    for size in range(1, 9):
        for pad in range(0, 8):
            got = reflect_indices(size, pad)
            assert got.shape == (size + 2 * pad,)
            assert got.min() >= 0 and got.max() <= size - 1
            if pad < size:
                line = torch.arange(size, dtype=torch.float64)[None, None]
                expected = F.pad(line, (pad, pad), mode="reflect")[0, 0].long()
                assert torch.equal(got, expected), (size, pad)
    assert reflect_indices(2, 3).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert reflect_indices(3, 3).tolist() == [1, 2, 1, 0, 1, 2, 1, 0, 1]
    assert reflect_indices(1, 3).tolist() == [0] * 7
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(reflect_pad2d(x, 3), nn.ReflectionPad2d(3)(x))


def test_symbolic_sizes_use_the_same_reflection() -> None:
    """Under ``torch.export`` with dynamic dims the indices come from tensor arithmetic."""

    class Pad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return reflect_pad2d(x, 3)

    dims = {2: Dim("h", min=1), 3: Dim("w", min=1)}
    program = torch.export.export(Pad(), (torch.randn(1, 2, 9, 7),), dynamic_shapes=({**dims},))
    assert "index_select" in str(program.graph) and "floor" in str(program.graph)
    for h, w in [(1, 1), (2, 3), (3, 8), (5, 4)]:
        x = torch.randn(1, 2, h, w)
        assert torch.equal(program.module()(x), reflect_pad2d(x, 3)), (h, w)


def test_a_single_pixel_attends_only_to_itself() -> None:
    """On a 1x1 input every window position replicates the pixel: the attention path is v."""
    block = bz.ACmix(8, 8, kernel_att=7)
    x = torch.randn(3, 8, 1, 1)
    v = block.conv3(x)
    att = block.explain(x)["attention"]
    torch.testing.assert_close(att, torch.full_like(att, 1 / 49))
    out = block(x)
    conv = block.conv_path(block.conv1(x), block.conv2(x), v)
    torch.testing.assert_close(out, block.rate1 * v + block.rate2 * conv)


def test_small_input_uses_iterated_reflection() -> None:
    """2x3 input, 7x7 window: rows -3..4 read rows [1,0,1,0,1,0,1,0], cols [1,2,1,0,1,2,1,0,1]."""
    q, k, v, pe = _qkvpe(2, 4, 2, 3)
    rows, cols = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0]), torch.tensor([1, 2, 1, 0, 1, 2, 1, 0, 1])

    def pad(t):
        return t[:, :, rows][:, :, :, cols]

    unfold_k = F.unfold(pad(k - pe), 7).reshape(2, 4, 49, 2, 3)
    att = (q.unsqueeze(2) * unfold_k).sum(1).softmax(1)
    expected = (att.unsqueeze(1) * F.unfold(pad(v), 7).reshape(2, 4, 49, 2, 3)).sum(2)
    torch.testing.assert_close(local_window_attention(q, k, v, pe, 7), expected)


def test_shift_kernel_init_rates_and_layer_shapes() -> None:
    block = bz.ACmix(32, 64, kernel_att=7, head=4, kernel_conv=3)
    assert block.head_dim == 16
    assert block.rate1.item() == 0.5 and block.rate2.item() == 0.5
    dep = block.dep_conv
    assert dep.bias is None and dep.groups == 16 and dep.in_channels == 9 * 16
    assert dep.weight.shape == (64, 9, 3, 3)
    for i in range(9):  # input i of every group is a one-hot at tap (i // 3, i % 3)
        expected = torch.zeros(3, 3)
        expected[i // 3, i % 3] = 1
        assert torch.equal(dep.weight[:, i], expected.expand(64, 3, 3))
    assert block.fc.bias is None and block.fc.weight.shape == (9, 12, 1, 1)
    assert block.conv_p.weight.shape == (16, 2, 1, 1) and block.conv_p.bias is not None
    for conv in (block.conv1, block.conv2, block.conv3):
        assert conv.weight.shape == (64, 32, 1, 1) and conv.bias is not None
    expected_params = 3 * (32 * 64 + 64) + (2 * 16 + 16) + 12 * 9 + 64 * 9 * 9 + 2
    assert sum(p.numel() for p in block.parameters()) == expected_params


def test_shift_kernels_make_the_conv_path_a_sum_of_shifted_features() -> None:
    block = bz.ACmix(8, 8, head=2, kernel_conv=3)  # head_dim 4
    x = torch.randn(2, 8, 5, 6)
    q, k, v = block.conv1(x), block.conv2(x), block.conv3(x)
    f_all = block.fc(torch.cat([t.reshape(2, 2, 4, 30) for t in (q, k, v)], 1))  # (2, 9, 4, 30)
    f = F.pad(f_all.reshape(2, 9, 4, 5, 6), (1, 1, 1, 1))
    shifted = sum(f[:, i, :, i // 3 : i // 3 + 5, i % 3 : i % 3 + 6] for i in range(9))
    expected = shifted.repeat_interleave(2, dim=1)  # output channel o reads group o // head
    torch.testing.assert_close(block.conv_path(q, k, v), expected)


@pytest.mark.parametrize(("out", "head"), [(24, 5), (10, 4), (7, 2)])
def test_out_channels_must_be_divisible_by_head(out, head) -> None:
    with pytest.raises(ValueError, match=rf"ACmix: out_channels \({out}\).*head \({head}\)"):
        bz.ACmix(16, out, head=head)


@pytest.mark.parametrize(
    "kwargs", [{"kernel_att": 6}, {"kernel_conv": 2}, {"head": 0}, {"dilation": 0}, {"stride": 3}]
)
def test_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError, match="ACmix"):
        bz.ACmix(16, 16, **kwargs)


def test_explain_attention_weights_sum_to_one() -> None:
    block = bz.ACmix(16, 24, 2, head=4, kernel_att=5)
    x = torch.randn(2, 16, 9, 7)
    info = block.explain(x)
    assert info["attention"].shape == (2, 4, 25, 5, 4)
    torch.testing.assert_close(info["attention"].sum(2), torch.ones(2, 4, 5, 4))
    torch.testing.assert_close(info["rates"], torch.tensor([0.5, 0.5]))


def test_position_grid_values_device_and_dtype() -> None:
    like = torch.empty(0, dtype=torch.float16)
    grid = position_grid(3, 5, like)
    assert grid.shape == (1, 2, 3, 5) and grid.dtype == torch.float16
    expected_w = torch.linspace(-1, 1, 5)
    expected_h = torch.linspace(-1, 1, 3)
    torch.testing.assert_close(grid[0, 0].float(), expected_w.expand(3, 5))
    torch.testing.assert_close(grid[0, 1].float(), expected_h[:, None].expand(3, 5))
    assert position_grid(1, 1, torch.empty(0)).flatten().tolist() == [-1.0, -1.0]
    meta = position_grid(4, 4, torch.empty(0, device="meta", dtype=torch.bfloat16))
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_block(dtype) -> None:
    block = bz.ACmix(16, 16, 2)
    x = torch.randn(2, 16, 9, 7)
    expected = block(x)
    y = block.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert (y.float() - expected).norm() / expected.norm() < 3e-2


def _saved_bytes(fn, *inputs) -> int:
    """Bytes of distinct storages autograd keeps for ``fn``'s backward (views counted once)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def test_attention_keeps_far_less_for_the_backward_than_the_unfold_reference() -> None:
    inputs = [t.float().requires_grad_() for t in _qkvpe(8, 16, 28, 28)]
    ours = _saved_bytes(local_window_attention, *inputs, 7)
    reference = _saved_bytes(acmix_attention_unfold_reference, *inputs, 7)
    one = inputs[0].numel() * 4
    # ours: padded k - pe and v (~1.5 x q each), q, and the weights (49 / 16 x q)
    assert ours < 8 * one
    assert ours * 3 <= reference


def test_window_weights_layout_is_row_major() -> None:
    """With k - pe peaked at one pixel, the weight peaks at the window tap reaching it."""
    q = torch.ones(1, 1, 7, 7)
    k = torch.zeros(1, 1, 7, 7)
    k[0, 0, 3, 5] = 100.0
    att = window_attention_weights(q, k, torch.zeros(1, 1, 7, 7), 3)
    assert att[0, :, 3, 4].argmax() == 1 * 3 + 2  # row offset 0 -> u = 1, col offset +1 -> v = 2


def test_registry_entry_and_default_block() -> None:
    info = bz.block_info("acmix")
    assert info.kind == "conv" and info.width == "free" and info.strides == (1, 2)
    assert info.arxiv == "2111.14556"
    assert info.defaults["kernel_att"] == 7 and info.defaults["head"] == 4
    assert info.defaults["kernel_conv"] == 3 and info.defaults["dilation"] == 1
    block = bz.create_block("acmix", 64)
    with torch.no_grad():
        assert block(torch.randn(1, 64, 56, 56)).shape == (1, 64, 56, 56)


def test_extra_flops_counts_the_window_attention() -> None:
    from blockzoo.core import count_flops

    block = bz.ACmix(16, 32, stride=2, kernel_att=7).eval()
    x = torch.randn(2, 16, 9, 7)
    # q scaling and k - pe per q/k value; scores, weighted sum and the two rates per output
    declared = 2 * (2 * 2 * 32 * 9 * 7 + (2 * 49 + 2) * 2 * 32 * 5 * 4)
    assert block.extra_flops(x) == declared
    block.extra_flops = lambda x: 0  # the counter alone, for comparison
    with torch.no_grad():
        seen = count_flops(block, x)
    del block.extra_flops
    with torch.no_grad():
        assert count_flops(block, x) == seen + declared
