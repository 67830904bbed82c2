"""Deformable sampling (v1, and v2 with a mask) as compiled CPU operators, and offset sanitising.

Deformable Convolutional Networks, Dai et al., ICCV 2017, arXiv 1703.06211; Deformable ConvNets
v2, Zhu et al., CVPR 2019, arXiv 1811.11168

:func:`deform_conv2d` computes ``torchvision.ops.deform_conv2d`` (same arguments and layouts) as
one custom operator (``blockzoo::deform_conv2d``): a compiled bilinear im2col followed by a
batched matrix product (BLAS). The im2col computes each sampling point's four corners and weights
once per offset group, kernel tap and block of output positions, then gathers them for every
channel of the group (parallel over batch, offset group and tap). The backward operator
(``blockzoo::deform_conv2d_backward``) gives the gradients to the input, the offsets and the mask
in one compiled pass, parallel over batch and offset group, each job writing only its own channels
and offsets (deterministic), then rebuilds the columns for the weight gradient instead of keeping
them from the forward pass.

Non-finite offsets: :func:`finite_offset` replaces NaN and +-inf offsets by a finite offset that
places the sampling point outside the image, where the sample is zero (as for any point beyond the
border) and its gradient is zero. Every path of the deformable blocks applies it, because
torchvision's CPU kernel crashes on a NaN offset and gives NaN gradients on an infinite one. A
non-finite mask value or input value is multiplied in like any other (NaN results, no crash).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.modules.utils import _pair

from ._backend import as_array, kernel, kernel_threads, prange

IntPair = int | tuple[int, int]
_BLOCK = 512  # output positions whose sampling plan (corner indices and weights) stays in cache


def finite_offset(
    offset: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """``offset`` with NaN and +-inf replaced by an offset that samples outside the image.

    The replacement is ``-(largest base coordinate + 2)``: every tap of every output position
    then samples at a row and column ``<= -1``, which is outside, so it contributes zero.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = offset.shape[-2:]
    largest = max((ho - 1) * sh - ph + (kernel_size[0] - 1) * dh,
                  (wo - 1) * sw - pw + (kernel_size[1] - 1) * dw)
    outside = offset.new_full((), -float(largest + 2))
    return torch.where(offset.isfinite(), offset, outside)


@kernel()
def _im2col(x, offset, mask, has_mask, geometry, columns):  # pragma: no cover - compiled
    n, c, h, w = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    taps = kh * kw
    ho, wo = offset.shape[2], offset.shape[3]
    length = ho * wo
    groups = offset.shape[1] // (2 * taps)
    cg = c // groups
    for job in prange(n * groups * taps):
        b, g, t = job // (groups * taps), (job // taps) % groups, job % taps
        index = np.zeros((4, _BLOCK), dtype=np.int32)
        weight = np.zeros((4, _BLOCK), dtype=x.dtype)
        for start in range(0, length, _BLOCK):
            stop = min(start + _BLOCK, length)
            index[:] = 0
            weight[:] = 0
            for l in range(start, stop):
                i, j = l // wo, l % wo
                py = i * sh - ph + (t // kw) * dh + offset[b, 2 * (g * taps + t), i, j]
                px = j * sw - pw + (t % kw) * dw + offset[b, 2 * (g * taps + t) + 1, i, j]
                if not (py > -1 and py < h and px > -1 and px < w):
                    continue
                scale = mask[b, g * taps + t, i, j] if has_mask else 1.0
                y0, x0 = int(np.floor(py)), int(np.floor(px))
                ly, lx = py - y0, px - x0
                for corner in range(4):
                    cy, cx = y0 + corner // 2, x0 + corner % 2
                    if cy >= 0 and cy < h and cx >= 0 and cx < w:
                        wy = ly if corner // 2 else 1 - ly
                        wx = lx if corner % 2 else 1 - lx
                        index[corner, l - start] = cy * w + cx
                        weight[corner, l - start] = wy * wx * scale
            for cc in range(cg):
                ch = g * cg + cc
                plane = x[b, ch].ravel()
                row = columns[b, ch * taps + t]
                for l in range(stop - start):
                    row[start + l] = (weight[0, l] * plane[index[0, l]]
                                      + weight[1, l] * plane[index[1, l]]
                                      + weight[2, l] * plane[index[2, l]]
                                      + weight[3, l] * plane[index[3, l]])


@kernel()
def _col2im(x, offset, mask, has_mask, geometry, grad_columns,
            grad_x, grad_offset, grad_mask):  # pragma: no cover - compiled
    n, c, h, w = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    taps = kh * kw
    ho, wo = offset.shape[2], offset.shape[3]
    length = ho * wo
    groups = offset.shape[1] // (2 * taps)
    cg = c // groups
    for job in prange(n * groups):
        b, g = job // groups, job % groups
        for cc in range(cg):
            grad_x[b, g * cg + cc] = 0
        valid = np.zeros(length, dtype=np.bool_)
        y0s = np.zeros(length, dtype=np.int64)
        x0s = np.zeros(length, dtype=np.int64)
        lys = np.zeros(length, dtype=x.dtype)
        lxs = np.zeros(length, dtype=x.dtype)
        scales = np.ones(length, dtype=x.dtype)
        acc_y = np.zeros(length, dtype=x.dtype)
        acc_x = np.zeros(length, dtype=x.dtype)
        acc_m = np.zeros(length, dtype=x.dtype)
        for t in range(taps):
            for l in range(length):
                i, j = l // wo, l % wo
                py = i * sh - ph + (t // kw) * dh + offset[b, 2 * (g * taps + t), i, j]
                px = j * sw - pw + (t % kw) * dw + offset[b, 2 * (g * taps + t) + 1, i, j]
                valid[l] = py > -1 and py < h and px > -1 and px < w
                if valid[l]:
                    y0s[l], x0s[l] = int(np.floor(py)), int(np.floor(px))
                    lys[l], lxs[l] = py - y0s[l], px - x0s[l]
                if has_mask:
                    scales[l] = mask[b, g * taps + t, i, j]
                acc_y[l] = acc_x[l] = acc_m[l] = 0
            for cc in range(cg):
                ch = g * cg + cc
                plane = x[b, ch]
                grad_plane = grad_x[b, ch]
                grow = grad_columns[b, ch * taps + t]
                for l in range(length):
                    if not valid[l]:
                        continue
                    y0, x0, ly, lx = y0s[l], x0s[l], lys[l], lxs[l]
                    top, left = y0 >= 0, x0 >= 0
                    bottom, right = y0 + 1 < h, x0 + 1 < w
                    v00 = plane[y0, x0] if top and left else 0.0
                    v01 = plane[y0, x0 + 1] if top and right else 0.0
                    v10 = plane[y0 + 1, x0] if bottom and left else 0.0
                    v11 = plane[y0 + 1, x0 + 1] if bottom and right else 0.0
                    g_out = grow[l]
                    g_scaled = g_out * scales[l]
                    acc_m[l] += g_out * ((1 - ly) * ((1 - lx) * v00 + lx * v01)
                                         + ly * ((1 - lx) * v10 + lx * v11))
                    acc_y[l] += g_scaled * ((1 - lx) * (v10 - v00) + lx * (v11 - v01))
                    acc_x[l] += g_scaled * ((1 - ly) * (v01 - v00) + ly * (v11 - v10))
                    if top and left:
                        grad_plane[y0, x0] += g_scaled * (1 - ly) * (1 - lx)
                    if top and right:
                        grad_plane[y0, x0 + 1] += g_scaled * (1 - ly) * lx
                    if bottom and left:
                        grad_plane[y0 + 1, x0] += g_scaled * ly * (1 - lx)
                    if bottom and right:
                        grad_plane[y0 + 1, x0 + 1] += g_scaled * ly * lx
            for l in range(length):
                i, j = l // wo, l % wo
                grad_offset[b, 2 * (g * taps + t), i, j] = acc_y[l]
                grad_offset[b, 2 * (g * taps + t) + 1, i, j] = acc_x[l]
                if has_mask:
                    grad_mask[b, g * taps + t, i, j] = acc_m[l]


def _columns_shape(x: torch.Tensor, offset: torch.Tensor, taps: int) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1] * taps, offset.shape[2] * offset.shape[3]


def _mask_operand(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return x.new_ones(1, 1, 1, 1), False
    return mask.contiguous(), True


def _run_im2col(x, offset, mask_array, has_mask, geometry) -> torch.Tensor:
    columns = x.new_empty(_columns_shape(x, offset, geometry[0] * geometry[1]))
    if columns.numel():
        with kernel_threads():
            _im2col(as_array(x), as_array(offset), as_array(mask_array), has_mask,
                    np.asarray(geometry, dtype=np.int64), as_array(columns))
    return columns


def _kernel_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(O, C / groups, kh, kw) -> (groups, O / groups, C / groups * kh * kw)``."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _out_shape(x, offset, weight) -> tuple[int, int, int, int]:
    return x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]


@torch.library.custom_op("blockzoo::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    geometry: list[int],
) -> torch.Tensor:
    """Deformable convolution without bias: bilinear im2col, then a batched matrix product.

    ``geometry`` is ``[kh, kw, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w]``;
    layouts as :func:`deform_conv2d`. CPU, float32/float64, equal dtypes.
    """
    x, offset, weight = x.contiguous(), offset.contiguous(), weight.contiguous()
    mask_array, has_mask = _mask_operand(x, mask)
    n, c = x.shape[:2]
    groups = c // weight.shape[1]
    columns = _run_im2col(x, offset, mask_array, has_mask, geometry)
    columns = columns.reshape(n, groups, columns.shape[1] // groups, columns.shape[2])
    out = torch.matmul(_kernel_matrix(weight, groups), columns)
    return out.reshape(_out_shape(x, offset, weight))


@deform_conv2d_op.register_fake
def _(x, offset, mask, weight, geometry):
    return x.new_empty(_out_shape(x, offset, weight))


@torch.library.custom_op("blockzoo::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
    weight: torch.Tensor, geometry: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`deform_conv2d_op` to ``x``, ``offset``, ``mask`` (a ``(1, 1, 1, 1)``
    zero when there is none) and ``weight``.

    The column gradients are scattered and freed before the columns are rebuilt for the weight
    gradient, so at most one columns-sized buffer is alive at a time (nothing is saved from the
    forward pass but its inputs).
    """
    grad, x, offset, weight = (t.contiguous() for t in (grad, x, offset, weight))
    mask_array, has_mask = _mask_operand(x, mask)
    n, c = x.shape[:2]
    groups = c // weight.shape[1]
    kernel_matrix = _kernel_matrix(weight, groups)
    grad_rows = grad.reshape(n, groups, kernel_matrix.shape[1], grad.shape[2] * grad.shape[3])
    grad_x, grad_offset = torch.zeros_like(x), torch.zeros_like(offset)
    grad_mask = torch.zeros_like(mask_array)
    grad_columns = torch.matmul(kernel_matrix.transpose(1, 2), grad_rows).reshape(
        _columns_shape(x, offset, geometry[0] * geometry[1])
    )
    if grad_columns.numel():
        with kernel_threads():
            _col2im(as_array(x), as_array(offset), as_array(mask_array), has_mask,
                    np.asarray(geometry, dtype=np.int64), as_array(grad_columns),
                    as_array(grad_x), as_array(grad_offset), as_array(grad_mask))
    del grad_columns
    columns = _run_im2col(x, offset, mask_array, has_mask, geometry)
    columns = columns.reshape(n, groups, columns.shape[1] // groups, columns.shape[2])
    grad_weight = torch.zeros_like(kernel_matrix)
    for sample in range(n):  # one sample at a time: no (N, O, C * kh * kw) intermediate
        grad_weight.baddbmm_(grad_rows[sample], columns[sample].transpose(1, 2))
    return grad_x, grad_offset, grad_mask, grad_weight.reshape(weight.shape)


@deform_conv2d_backward.register_fake
def _(grad, x, offset, mask, weight, geometry):
    grad_mask = torch.empty_like(mask) if mask is not None else x.new_empty(1, 1, 1, 1)
    return torch.empty_like(x), torch.empty_like(offset), grad_mask, torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, offset, mask, weight, geometry = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.geometry = geometry


def _backward(ctx, grad):
    x, offset, mask, weight = ctx.saved_tensors
    grad_x, grad_offset, grad_mask, grad_weight = deform_conv2d_backward(
        grad, x, offset, mask, weight, ctx.geometry
    )
    return grad_x, grad_offset, (grad_mask if mask is not None else None), grad_weight, None


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` on the compiled operator (CPU, float32/float64).

    ``input`` ``(N, C, H, W)``; ``offset`` ``(N, 2 * G * kh * kw, Ho, Wo)`` (row offset, then
    column offset, per offset group and row-major tap); ``mask`` ``(N, G * kh * kw, Ho, Wo)`` or
    None; ``weight`` ``(O, C / groups, kh, kw)``. A sampling point that is not finite lies
    outside the image (zero sample, zero gradient). Returns ``(N, O, Ho, Wo)``.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    out = deform_conv2d_op(input, offset, mask, weight, [kh, kw, sh, sw, ph, pw, dh, dw])
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out
