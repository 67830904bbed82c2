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
_TILE_BYTES = 1 << 20  # one tile of columns (rows x C * kh * kw) stays in the L2 cache


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


@kernel(parallel=False)
def _sampling_point(offset, mask, has_mask, b, k, i, j, t, h, w, geometry):
    # pragma: no cover - compiled
    """Tap ``t`` (offset channel pair ``k``) of output ``(i, j)``: its four corner pixels
    (``h * w``, the zero pixel, for a corner outside the image), fractions ``ly, lx``, mask value
    and whether the point lies inside ``(-1, h) x (-1, w)`` at all."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    real = offset.dtype.type  # coordinates in the offsets' precision, as torchvision
    py = real(i * sh - ph + (t // kw) * dh) + offset[b, 2 * k, i, j]
    px = real(j * sw - pw + (t % kw) * dw) + offset[b, 2 * k + 1, i, j]
    scale = mask[b, k, i, j] if has_mask else real(1)
    outside = h * w
    if not (py > -1 and py < h and px > -1 and px < w):  # also false for NaN
        return outside, outside, outside, outside, real(0), real(0), scale, False
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    top, left, bottom, right = y0 >= 0, x0 >= 0, y0 + 1 < h, x0 + 1 < w
    p00 = y0 * w + x0 if top and left else outside
    p01 = y0 * w + x0 + 1 if top and right else outside
    p10 = (y0 + 1) * w + x0 if bottom and left else outside
    p11 = (y0 + 1) * w + x0 + 1 if bottom and right else outside
    return p00, p01, p10, p11, py - real(y0), px - real(x0), scale, True


@kernel()
def _sample_tile(pixels, h, w, offset, mask, has_mask, geometry, groups, start, tile):
    # pragma: no cover - compiled
    """Columns of the flattened (batch, output position) rows ``start, start + 1, ...``:
    ``tile[r, g * taps * Cg + t * Cg + c]`` is tap ``t`` of channel ``c`` of conv group ``g``."""
    c = pixels.shape[2]
    taps = geometry[0] * geometry[1]
    wo = offset.shape[3]
    length = offset.shape[2] * wo
    offset_groups = offset.shape[1] // (2 * taps)
    c_off, c_conv = c // offset_groups, c // groups
    for r in prange(tile.shape[0]):
        b, l = (start + r) // length, (start + r) % length
        i, j = l // wo, l % wo
        src = pixels[b]
        row = tile[r]
        for og in range(offset_groups):
            for t in range(taps):
                p00, p01, p10, p11, ly, lx, scale, _ = _sampling_point(
                    offset, mask, has_mask, b, og * taps + t, i, j, t, h, w, geometry)
                one = offset.dtype.type(1)
                a00, a01 = (one - ly) * (one - lx) * scale, (one - ly) * lx * scale
                a10, a11 = ly * (one - lx) * scale, ly * lx * scale
                for g in range(og * c_off // c_conv, ((og + 1) * c_off - 1) // c_conv + 1):
                    lo, hi = max(og * c_off, g * c_conv), min((og + 1) * c_off, (g + 1) * c_conv)
                    at = g * (taps - 1) * c_conv + t * c_conv  # column of channel ch: at + ch
                    # slices: index loops from 0 (no negative-index check) vectorise
                    s00, s01 = src[p00, lo:hi], src[p01, lo:hi]
                    s10, s11 = src[p10, lo:hi], src[p11, lo:hi]
                    out = row[at + lo : at + hi]
                    for q in range(hi - lo):
                        out[q] = a00 * s00[q] + a01 * s01[q] + a10 * s10[q] + a11 * s11[q]


@kernel(reassociate=True)
def _backward_tile(pixels, h, w, offset, mask, has_mask, geometry, groups, start, grad_tile,
                   chunk, grad_pixels, grad_offset, grad_mask, tile):  # pragma: no cover
    """For the rows of ``grad_tile`` (column gradients, layout of :func:`_sample_tile`): add
    their scatter to ``grad_pixels``, write the offset and mask gradients, and rebuild the
    columns into ``tile`` (for the weight gradient).

    Parallel over blocks of ``chunk`` channels: each block scatters into its own channels only
    and keeps its own partial offset and mask sums, added in block order (deterministic).
    """
    c = pixels.shape[2]
    taps = geometry[0] * geometry[1]
    wo = offset.shape[3]
    length = offset.shape[2] * wo
    offset_groups = offset.shape[1] // (2 * taps)
    c_off, c_conv = c // offset_groups, c // groups
    rows, points = grad_tile.shape[0], offset_groups * taps
    outside = h * w
    corner = np.empty((rows, points, 4), dtype=np.int64)
    frac = np.empty((rows, points, 3), dtype=pixels.dtype)
    inside = np.empty((rows, points), dtype=np.bool_)
    for r in prange(rows):
        b, l = (start + r) // length, (start + r) % length
        for k in range(points):
            (corner[r, k, 0], corner[r, k, 1], corner[r, k, 2], corner[r, k, 3], frac[r, k, 0],
             frac[r, k, 1], frac[r, k, 2], inside[r, k]) = _sampling_point(
                offset, mask, has_mask, b, k, l // wo, l % wo, k % taps, h, w, geometry)
    blocks = -(-c // chunk)
    partial = np.zeros((blocks, rows, points, 3), dtype=pixels.dtype)
    for blk in prange(blocks):
        c0, c1 = blk * chunk, min(c, (blk + 1) * chunk)
        for r in range(rows):
            b = (start + r) // length
            src, dst = pixels[b], grad_pixels[b]
            grow, row = grad_tile[r], tile[r]
            for og in range(offset_groups):
                lo_og, hi_og = max(c0, og * c_off), min(c1, (og + 1) * c_off)
                for t in range(taps if lo_og < hi_og else 0):
                    k = og * taps + t
                    p00, p01, p10, p11 = corner[r, k]
                    ly, lx, scale = frac[r, k, 0], frac[r, k, 1], frac[r, k, 2]
                    my, mx = frac.dtype.type(1) - ly, frac.dtype.type(1) - lx
                    b00, b01, b10, b11 = my * mx, my * lx, ly * mx, ly * lx
                    a00, a01, a10, a11 = b00 * scale, b01 * scale, b10 * scale, b11 * scale
                    all_inside = max(p00, p01, p10, p11) < outside
                    acc_y = acc_x = acc_m = frac.dtype.type(0)
                    for g in range(lo_og // c_conv, (hi_og - 1) // c_conv + 1):
                        lo, hi = max(lo_og, g * c_conv), min(hi_og, (g + 1) * c_conv)
                        at = g * (taps - 1) * c_conv + t * c_conv
                        s00, s01 = src[p00, lo:hi], src[p01, lo:hi]
                        s10, s11 = src[p10, lo:hi], src[p11, lo:hi]
                        g_in, out = grow[at + lo : at + hi], row[at + lo : at + hi]
                        for q in range(hi - lo):
                            v00, v01, v10, v11 = s00[q], s01[q], s10[q], s11[q]
                            gc = g_in[q]
                            out[q] = a00 * v00 + a01 * v01 + a10 * v10 + a11 * v11
                            acc_m += gc * (b00 * v00 + b01 * v01 + b10 * v10 + b11 * v11)
                            acc_y += gc * (mx * (v10 - v00) + lx * (v11 - v01))
                            acc_x += gc * (my * (v01 - v00) + ly * (v11 - v10))
                        if all_inside:
                            d00, d01 = dst[p00, lo:hi], dst[p01, lo:hi]
                            d10, d11 = dst[p10, lo:hi], dst[p11, lo:hi]
                            for q in range(hi - lo):
                                gc = g_in[q]
                                d00[q] += a00 * gc
                                d01[q] += a01 * gc
                                d10[q] += a10 * gc
                                d11[q] += a11 * gc
                        else:
                            for p, a in ((p00, a00), (p01, a01), (p10, a10), (p11, a11)):
                                if p < outside:
                                    d = dst[p, lo:hi]
                                    for q in range(hi - lo):
                                        d[q] += a * g_in[q]
                    partial[blk, r, k, 0], partial[blk, r, k, 1] = acc_y, acc_x
                    partial[blk, r, k, 2] = acc_m
    for r in prange(rows):
        b, l = (start + r) // length, (start + r) % length
        i, j = l // wo, l % wo
        for k in range(points):
            acc_y = acc_x = acc_m = frac.dtype.type(0)
            for blk in range(blocks):
                acc_y += partial[blk, r, k, 0]
                acc_x += partial[blk, r, k, 1]
                acc_m += partial[blk, r, k, 2]
            if not inside[r, k]:
                acc_y = acc_x = acc_m = frac.dtype.type(0)
            grad_offset[b, 2 * k, i, j] = acc_y * frac[r, k, 2]
            grad_offset[b, 2 * k + 1, i, j] = acc_x * frac[r, k, 2]
            if has_mask:
                grad_mask[b, k, i, j] = acc_m


def _mask_operand(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return x.new_ones(1, 1, 1, 1), False
    return mask.contiguous(), True


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, H * W + 1, C)``: channels last, plus one zero pixel (index
    ``H * W``) that corners outside the image read."""
    n, c, h, w = x.shape
    pixels = x.new_empty(n, h * w + 1, c)
    pixels[:, h * w].zero_()
    pixels[:, : h * w].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))
    return pixels


def _kernel_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(O, C / groups, kh, kw) -> (groups, O / groups, kh * kw * C / groups)``, tap-major
    (the column order of :func:`_sample_tile`)."""
    o, cg, kh, kw = weight.shape
    matrix = weight.reshape(groups, o // groups, cg, kh * kw).transpose(2, 3)
    return matrix.reshape(groups, o // groups, kh * kw * cg)


def _tiles(rows: int, columns: int, x: torch.Tensor):
    """``(start, tile)`` over ``rows`` flattened (batch, position) rows, ``tile`` a
    ``(rows in this tile, columns)`` buffer of about :data:`_TILE_BYTES` reused by every tile."""
    size = max(1, min(rows, _TILE_BYTES // (columns * x.element_size())))
    buffer = x.new_empty(size, columns)
    for start in range(0, rows, size):
        yield start, buffer[: min(size, rows - start)]


def _segments(start: int, count: int, length: int):
    """``(b, l0, l1, r0)``: rows ``start .. start + count`` of the flattened (batch, position)
    index split by sample, ``r0`` the segment's first row in the tile."""
    r = start
    while r < start + count:
        b, l0 = divmod(r, length)
        l1 = min(length, l0 + start + count - r)
        yield b, l0, l1, r - start
        r += l1 - l0


def _out_shape(x, offset, weight) -> tuple[int, int, int, int]:
    return x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]


@torch.library.custom_op("blockzoo::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    geometry: list[int],
) -> torch.Tensor:
    """Deformable convolution without bias: bilinear columns and matrix products, tile by tile.

    ``geometry`` is ``[kh, kw, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w]``;
    layouts as :func:`deform_conv2d`. CPU, float32/float64, equal dtypes.
    """
    offset, weight = offset.contiguous(), weight.contiguous()
    mask_array, has_mask = _mask_operand(x, mask)
    n, c, h, w = x.shape
    groups = c // weight.shape[1]
    out = x.new_empty(_out_shape(x, offset, weight))
    length = out.shape[2] * out.shape[3]
    if out.numel() == 0:
        return out
    pixels = _pixels(x)
    kernels = _kernel_matrix(weight, groups)
    o_g, k_g = kernels.shape[1:]
    flat = out.view(n, -1, length)
    arrays = (as_array(pixels), h, w, as_array(offset), as_array(mask_array), has_mask,
              np.asarray(geometry, dtype=np.int64), groups)
    with kernel_threads():
        for start, tile in _tiles(n * length, groups * k_g, x):
            _sample_tile(*arrays, start, as_array(tile))
            for b, l0, l1, r0 in _segments(start, tile.shape[0], length):
                for g in range(groups):
                    torch.mm(kernels[g], tile[r0 : r0 + l1 - l0, g * k_g : (g + 1) * k_g].t(),
                             out=flat[b, g * o_g : (g + 1) * o_g, l0:l1])
    return out


@deform_conv2d_op.register_fake
def _(x, offset, mask, weight, geometry):
    return x.new_empty(_out_shape(x, offset, weight))


def _channels_last_like(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty(n, h, w, c).permute(0, 3, 1, 2)


@torch.library.custom_op("blockzoo::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
    weight: torch.Tensor, geometry: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`deform_conv2d_op` to ``x`` (channels-last strides), ``offset``,
    ``mask`` (a ``(1, 1, 1, 1)`` zero when there is none) and ``weight``.

    Tile by tile: the column gradients of the tile (a matrix product), then one compiled pass
    that scatters them to the input, gives the offset and mask gradients and rebuilds the
    tile's columns, then the tile's share of the weight gradient (a matrix product). Nothing is
    saved from the forward pass but its inputs.
    """
    grad, offset, weight = grad.contiguous(), offset.contiguous(), weight.contiguous()
    mask_array, has_mask = _mask_operand(x, mask)
    n, c, h, w = x.shape
    groups = c // weight.shape[1]
    kernels = _kernel_matrix(weight, groups)
    o_g, k_g = kernels.shape[1:]
    grad_x = _channels_last_like(x).zero_()
    grad_offset, grad_mask = torch.zeros_like(offset), torch.zeros_like(mask_array)
    grad_kernels = torch.zeros_like(kernels)
    length = offset.shape[2] * offset.shape[3]
    if n * length * c:
        pixels = _pixels(x)
        flat = grad.reshape(n, -1, length)
        arrays = (as_array(pixels), h, w, as_array(offset), as_array(mask_array), has_mask,
                  np.asarray(geometry, dtype=np.int64), groups)
        outputs = (as_array(grad_x.permute(0, 2, 3, 1).view(n, h * w, c)),
                   as_array(grad_offset), as_array(grad_mask))
        chunk = max(16, -(-c // 64) * 16)  # at most 4 channel blocks (2 threads, load balance)
        with kernel_threads():
            for (start, grad_tile), (_, tile) in zip(
                _tiles(n * length, groups * k_g, x), _tiles(n * length, groups * k_g, x),
                strict=True,
            ):
                segments = list(_segments(start, tile.shape[0], length))
                for b, l0, l1, r0 in segments:
                    for g in range(groups):
                        torch.mm(flat[b, g * o_g : (g + 1) * o_g, l0:l1].t(), kernels[g],
                                 out=grad_tile[r0 : r0 + l1 - l0, g * k_g : (g + 1) * k_g])
                _backward_tile(*arrays, start, as_array(grad_tile), chunk, *outputs,
                               as_array(tile))
                for b, l0, l1, r0 in segments:
                    for g in range(groups):
                        grad_kernels[g].addmm_(flat[b, g * o_g : (g + 1) * o_g, l0:l1],
                                               tile[r0 : r0 + l1 - l0, g * k_g : (g + 1) * k_g])
    o, cg, kh, kw = weight.shape
    grad_weight = grad_kernels.reshape(groups, o_g, kh * kw, cg).transpose(2, 3)
    return grad_x, grad_offset, grad_mask, grad_weight.reshape(weight.shape)


@deform_conv2d_backward.register_fake
def _(grad, x, offset, mask, weight, geometry):
    grad_mask = torch.empty_like(mask) if mask is not None else x.new_empty(1, 1, 1, 1)
    return _channels_last_like(x), torch.empty_like(offset), grad_mask, torch.empty_like(weight)


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
