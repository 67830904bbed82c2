"""Deformable sampling (v1, and v2 with a mask) as compiled CPU operators, and offset sanitising.

Deformable Convolutional Networks, Dai et al., ICCV 2017, arXiv 1703.06211; Deformable ConvNets
v2, Zhu et al., CVPR 2019, arXiv 1811.11168

:func:`deform_conv2d` computes ``torchvision.ops.deform_conv2d`` (same arguments and layouts) as
one custom operator (``blockzoo::deform_conv2d``), tile by tile: a compiled pass samples the
bilinear columns of a block of output positions (rows ``C * kh * kw`` long; :data:`_TILE_BYTES`
on one thread, so the tile stays in the L2 cache) from the input in channels-last layout, where
the four corners of a sampling point are contiguous runs of channels (the channel loops
vectorise; a point's corners and weights are computed once for all its channels), and one BLAS
product per tile turns them into whole channels-last output rows (bias included). No full
column matrix is built. The backward operator (``blockzoo::deform_conv2d_backward``) goes tile by
tile as well: the tile's column gradients (a product), then one compiled pass that scatters them
to the input, gives the offset and mask gradients and rebuilds the tile's columns, then the tile's
share of the weight gradient (a product). It is parallel over samples (each job writes only its
own sample's gradients, in a fixed order: bitwise the same on every run with the same number of
threads).

Non-finite offsets: the operator tests a sampling point before it becomes an index, so a NaN or
infinite offset samples outside the image (zero sample, zero gradient) as any point beyond the
border. :func:`finite_offset` replaces NaN and +-inf offsets by a finite offset with the same
effect for the other paths (torchvision's CPU kernel crashes on a NaN offset and gives NaN
gradients on an infinite one). A non-finite mask value or input value is multiplied in like any
other (NaN results, no crash).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.nn.modules.utils import _pair

from ._backend import as_array, kernel, kernel_threads, prange

IntPair = int | tuple[int, int]
_TILE_BYTES = 1 << 21  # a tile of columns on one thread: stays in the L2 cache (_tile_rows)


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
def _sampling_point(offset, mask, has_mask, point, l, length, y, x, h, w):
    # pragma: no cover - compiled
    """Offset pair ``point = b * points + k`` (sample ``b``, ``points`` pairs per sample) at
    output position ``l`` (``offset``, ``mask`` flat), regular-grid point ``(y, x)``: the four
    corner pixels (``h * w`` for a corner outside the image), fractions
    ``ly, lx``, mask value and whether the point lies inside ``[-1, h) x [-1, w)`` at all (false
    for NaN)."""
    real = offset.dtype.type  # coordinates in the offsets' precision, as torchvision
    at = np.uint64(2 * point * length + l)
    py, px = real(y) + offset[at], real(x) + offset[at + np.uint64(length)]
    scale = mask[np.uint64(point * length + l)] if has_mask else real(1)
    outside = h * w
    # [-1, h): at -1 the value is zero but the gradient is the one-sided one of the corners
    # above and right of the point, as everywhere (torchvision's convention)
    if not (py >= -1 and py < h and px >= -1 and px < w):
        return outside, outside, outside, outside, real(0), real(0), scale, False
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    top, left, bottom, right = y0 >= 0, x0 >= 0, y0 + 1 < h, x0 + 1 < w
    p00 = y0 * w + x0 if top and left else outside
    p01 = y0 * w + x0 + 1 if top and right else outside
    p10 = (y0 + 1) * w + x0 if bottom and left else outside
    p11 = (y0 + 1) * w + x0 + 1 if bottom and right else outside
    return p00, p01, p10, p11, py - real(y0), px - real(x0), scale, True


@kernel(parallel=False)
def _corner_starts(src, c, p00, p01, p10, p11, outside):  # pragma: no cover - compiled
    """Flat index of channel 0 of each corner pixel (of pixel 0 for a corner outside, so that
    every index stays in bounds)."""
    return (np.uint64(src + (p00 if p00 < outside else 0) * c),
            np.uint64(src + (p01 if p01 < outside else 0) * c),
            np.uint64(src + (p10 if p10 < outside else 0) * c),
            np.uint64(src + (p11 if p11 < outside else 0) * c))


@kernel()
def _sample_tile(pixels, h, w, offset, mask, has_mask, grid, spans, first, start, tile):
    # pragma: no cover - compiled
    """Columns of the flattened (batch, output position) rows ``start, start + 1, ...`` (see
    :func:`_plan`): ``tile[r, g * taps * Cg + t * Cg + c]`` is tap ``t`` of channel ``c`` of
    conv group ``g``. ``offset`` and ``mask`` are flat; ``pixels`` is ``(N, H * W, C)``."""
    n, stride, c = pixels.shape
    length, points = grid[0] * grid[1], first.shape[0] - 1
    flat = pixels.reshape(-1)
    for r in prange(tile.shape[0]):
        b, l = (start + r) // length, (start + r) % length
        y, x = (l // grid[1]) * grid[2] - grid[4], (l % grid[1]) * grid[3] - grid[5]
        src = b * stride * c
        row = tile[r]
        for k in range(points):
            t = k % grid[6]
            p00, p01, p10, p11, ly, lx, scale, _ = _sampling_point(
                offset, mask, has_mask, b * points + k, l, length,
                y + grid[7 + 2 * t], x + grid[8 + 2 * t], h, w)
            one = offset.dtype.type(1)
            a00, a01 = (one - ly) * (one - lx) * scale, (one - ly) * lx * scale
            a10, a11 = ly * (one - lx) * scale, ly * lx * scale
            s00, s01, s10, s11 = _corner_starts(src, c, p00, p01, p10, p11, h * w)
            for span in range(first[k], first[k + 1]):
                lo, hi, at = spans[span, 0], spans[span, 1], np.uint64(spans[span, 2])
                # unsigned indices (no negative-index wrap-around): the loops vectorise
                if max(p00, p01, p10, p11) < h * w:
                    for ch in range(np.uint64(lo), np.uint64(hi)):
                        row[at + ch] = (a00 * flat[s00 + ch] + a01 * flat[s01 + ch]
                                        + a10 * flat[s10 + ch] + a11 * flat[s11 + ch])
                    continue
                zero = scale * 0  # zero outside the image (NaN for a non-finite mask value)
                for ch in range(np.uint64(lo), np.uint64(hi)):
                    row[at + ch] = zero
                for p, corner, a in ((p00, s00, a00), (p01, s01, a01), (p10, s10, a10),
                                     (p11, s11, a11)):
                    if p < h * w:
                        for ch in range(np.uint64(lo), np.uint64(hi)):
                            row[at + ch] += a * flat[corner + ch]


@kernel(reassociate=True)
def _backward_tile(pixels, h, w, offset, mask, has_mask, grid, spans, first, b0, count, l0,
                   rows, grad_tiles, grad_pixels, grad_offset, grad_mask, tiles):
    # pragma: no cover - compiled
    """Samples ``b0 .. b0 + count``, output positions ``l0 .. l0 + rows``, one sample per job:
    from the column gradients ``grad_tiles[j]`` (layout of :func:`_sample_tile`) add the
    scatter to ``grad_pixels`` ``(N, H * W, C)``, write the (flat) offset and mask gradients,
    and rebuild the columns into ``tiles[j]`` (for the weight gradient).

    A job writes only its own sample's gradients, in a fixed order (deterministic).
    """
    n, stride, c = pixels.shape
    length, points = grid[0] * grid[1], first.shape[0] - 1
    flat, grad_flat = pixels.reshape(-1), grad_pixels.reshape(-1)
    outside = h * w
    real = pixels.dtype.type
    for j in prange(count):
        b = b0 + j
        src = b * stride * c  # sample b in pixels and in grad_pixels (the same layout)
        for r in range(rows):
            l = l0 + r
            y, x = (l // grid[1]) * grid[2] - grid[4], (l % grid[1]) * grid[3] - grid[5]
            grow, row = grad_tiles[j, r], tiles[j, r]
            for k in range(points):
                t = k % grid[6]
                p00, p01, p10, p11, ly, lx, scale, inside = _sampling_point(
                    offset, mask, has_mask, b * points + k, l, length,
                    y + grid[7 + 2 * t], x + grid[8 + 2 * t], h, w)
                my, mx = real(1) - ly, real(1) - lx
                b00, b01, b10, b11 = my * mx, my * lx, ly * mx, ly * lx
                a00, a01, a10, a11 = b00 * scale, b01 * scale, b10 * scale, b11 * scale
                s00, s01, s10, s11 = _corner_starts(src, c, p00, p01, p10, p11, outside)
                acc_y = acc_x = acc_m = real(0)
                for span in range(first[k], first[k + 1]):
                    lo, hi, at = spans[span, 0], spans[span, 1], np.uint64(spans[span, 2])
                    if max(p00, p01, p10, p11) < outside:
                        for ch in range(np.uint64(lo), np.uint64(hi)):
                            v00, v01 = flat[s00 + ch], flat[s01 + ch]
                            v10, v11 = flat[s10 + ch], flat[s11 + ch]
                            gc = grow[at + ch]
                            row[at + ch] = a00 * v00 + a01 * v01 + a10 * v10 + a11 * v11
                            acc_m += gc * (b00 * v00 + b01 * v01 + b10 * v10 + b11 * v11)
                            acc_y += gc * (mx * (v10 - v00) + lx * (v11 - v01))
                            acc_x += gc * (my * (v01 - v00) + ly * (v11 - v10))
                        for ch in range(np.uint64(lo), np.uint64(hi)):
                            gc = grow[at + ch]
                            grad_flat[s00 + ch] += a00 * gc
                            grad_flat[s01 + ch] += a01 * gc
                            grad_flat[s10 + ch] += a10 * gc
                            grad_flat[s11 + ch] += a11 * gc
                        continue
                    # a corner outside the image: its value is zero, nothing is scattered to it
                    in00, in01 = p00 < outside, p01 < outside
                    in10, in11 = p10 < outside, p11 < outside
                    for ch in range(np.uint64(lo), np.uint64(hi)):
                        v00 = flat[s00 + ch] if in00 else real(0)
                        v01 = flat[s01 + ch] if in01 else real(0)
                        v10 = flat[s10 + ch] if in10 else real(0)
                        v11 = flat[s11 + ch] if in11 else real(0)
                        gc = grow[at + ch]
                        row[at + ch] = a00 * v00 + a01 * v01 + a10 * v10 + a11 * v11
                        acc_m += gc * (b00 * v00 + b01 * v01 + b10 * v10 + b11 * v11)
                        acc_y += gc * (mx * (v10 - v00) + lx * (v11 - v01))
                        acc_x += gc * (my * (v01 - v00) + ly * (v11 - v10))
                    for p, d, a in ((p00, s00, a00), (p01, s01, a01), (p10, s10, a10),
                                    (p11, s11, a11)):
                        if p < outside:
                            for ch in range(np.uint64(lo), np.uint64(hi)):
                                grad_flat[d + ch] += a * grow[at + ch]
                acc_y, acc_x = acc_y * scale, acc_x * scale
                if not inside:  # zero, also where the mask is not finite
                    acc_y = acc_x = acc_m = real(0)
                at = (b * points + k) * length + l
                grad_offset[at + at - l] = acc_y  # (2 (b points + k)) L + l
                grad_offset[at + at - l + length] = acc_x
                if has_mask:
                    grad_mask[at] = acc_m


def _plan(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
          geometry: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the kernels need of the geometry, computed once per call.

    ``grid``: ``[Ho, Wo, stride_h, stride_w, pad_h, pad_w, taps]`` then
    the ``(dy, dx)`` of every tap. ``spans[first[k] : first[k + 1]]``: for offset pair ``k``
    (offset group ``k // taps``, tap ``k % taps``), the channel ranges ``[lo, hi)`` it samples,
    one per conv group, and where channel ``ch`` goes in a row of columns (``at + ch``).
    """
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    taps, c = kh * kw, x.shape[1]
    c_conv = weight.shape[1]
    offset_groups = offset.shape[1] // (2 * taps)
    c_off = c // offset_groups
    grid = [offset.shape[2], offset.shape[3], sh, sw, ph, pw, taps]
    for t in range(taps):
        grid += [(t // kw) * dh, (t % kw) * dw]
    spans, first = [], [0]
    for og in range(offset_groups):
        for t in range(taps):
            for g in range(og * c_off // c_conv, ((og + 1) * c_off - 1) // c_conv + 1):
                lo, hi = max(og * c_off, g * c_conv), min((og + 1) * c_off, (g + 1) * c_conv)
                spans.append((lo, hi, g * (taps - 1) * c_conv + t * c_conv))
            first.append(len(spans))
    return (np.asarray(grid, dtype=np.int64), np.asarray(spans, dtype=np.int64).reshape(-1, 3),
            np.asarray(first, dtype=np.int64))


def _mask_operand(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return x.new_ones(1, 1, 1, 1), False
    return mask.contiguous(), True


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, H * W, C)``, channels last (no copy when ``x`` is channels-last
    already)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).contiguous().view(n, h * w, c)


def _kernel_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(O, C / groups, kh, kw) -> (groups, O / groups, kh * kw * C / groups)``, tap-major
    (the column order of :func:`_sample_tile`)."""
    o, cg, kh, kw = weight.shape
    matrix = weight.reshape(groups, o // groups, cg, kh * kw).transpose(2, 3)
    return matrix.reshape(groups, o // groups, kh * kw * cg)


def _tile_rows(rows: int, columns: int, x: torch.Tensor) -> int:
    """Rows of ``columns`` values of ``x.dtype`` in one tile: :data:`_TILE_BYTES` (the L2
    cache) on one thread; on ``T > 1`` threads ``4 * T`` times as much (in the L3 cache).

    Every tile costs parallel calls (sampling, products) whose start and end wait for all the
    threads; on a machine whose cores are shared with other work, each such wait can last an
    OS time slice, so several threads get fewer, larger tiles (measured on 2 shared cores, 8x64x
    56x56 forward: 14 tiles took 6.7x the conv, 4 tiles 2.8x; on 1 thread the L2-sized tiles are
    the fastest).
    """
    threads = torch.get_num_threads()
    budget = _TILE_BYTES if threads == 1 else 4 * threads * _TILE_BYTES
    return max(1, min(rows, budget // (columns * x.element_size())))


def _tiles(rows: int, columns: int, x: torch.Tensor):
    """``(start, tile)`` over ``rows`` flattened (batch, position) rows, ``tile`` a
    ``(rows in this tile, columns)`` buffer (:func:`_tile_rows`) reused by every tile."""
    size = _tile_rows(rows, columns, x)
    buffer = x.new_empty(size, columns)
    for start in range(0, rows, size):
        yield start, buffer[: min(size, rows - start)]


def _out_shape(x, offset, weight) -> tuple[int, int, int, int]:
    return x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]


@torch.library.custom_op("blockzoo::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    geometry: list[int], bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable convolution: bilinear columns and matrix products, tile by tile.

    ``geometry`` is ``[kh, kw, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w]``;
    layouts as :func:`deform_conv2d`. CPU, float32/float64, equal dtypes. A tile of columns
    (``rows x C * kh * kw``, about :data:`_TILE_BYTES`) is sampled into the cache and multiplied
    there (with the bias added by the same product), so no full column matrix is ever built.
    Returns the result channels-last, ``(N, Ho, Wo, O)`` (each tile's product writes whole rows
    of it; :func:`deform_conv2d` gives the ``(N, O, Ho, Wo)`` view).
    """
    offset, weight = offset.contiguous(), weight.contiguous()
    mask_array, has_mask = _mask_operand(x, mask)
    n, c, h, w = x.shape
    groups = c // weight.shape[1]
    n, o, ho, wo = _out_shape(x, offset, weight)
    out = x.new_empty(n, ho, wo, o)
    if out.numel() == 0:
        return out
    rows = out.view(-1, o)
    pixels = _pixels(x)
    kernels = _kernel_matrix(weight, groups)
    o_g, k_g = kernels.shape[1:]
    arrays = (as_array(pixels), h, w, as_array(offset).reshape(-1),
              as_array(mask_array).reshape(-1), has_mask, *_plan(x, offset, weight, geometry))
    with kernel_threads(chunk=16):
        for start, tile in _tiles(rows.shape[0], groups * k_g, x):
            _sample_tile(*arrays, start, as_array(tile))
            for g in range(groups):
                columns = tile[:, g * k_g : (g + 1) * k_g]
                into = rows[start : start + tile.shape[0], g * o_g : (g + 1) * o_g]
                if bias is None:
                    torch.mm(columns, kernels[g].t(), out=into)
                else:
                    torch.addmm(bias[g * o_g : (g + 1) * o_g], columns, kernels[g].t(), out=into)
    return out


@deform_conv2d_op.register_fake
def _(x, offset, mask, weight, geometry, bias=None):
    n, o, ho, wo = _out_shape(x, offset, weight)
    return x.new_empty(n, ho, wo, o)


@torch.library.custom_op("blockzoo::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
    weight: torch.Tensor, geometry: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`deform_conv2d_op` (``grad`` channels-last like its result) to ``x``
    (channels-last, ``(N, H, W, C)``), ``offset``, ``mask`` (a ``(1, 1, 1, 1)`` zero when there
    is none) and ``weight``.

    Tile by tile: the column gradients of the tile (a matrix product), then one compiled pass
    that scatters them to the input, gives the offset and mask gradients and rebuilds the
    tile's columns, then the tile's share of the weight gradient (a matrix product). Nothing is
    saved from the forward pass but its inputs.
    """
    offset, weight = offset.contiguous(), weight.contiguous()
    mask_array, has_mask = _mask_operand(x, mask)
    n, c, h, w = x.shape
    groups = c // weight.shape[1]
    kernels = _kernel_matrix(weight, groups)
    o_g, k_g = kernels.shape[1:]
    grad_x = x.new_zeros(n, h, w, c)
    grad_offset, grad_mask = torch.zeros_like(offset), torch.zeros_like(mask_array)
    grad_kernels = torch.zeros_like(kernels)
    length = offset.shape[2] * offset.shape[3]
    if n * length * c:
        pixels = _pixels(x)
        grad_rows = grad.contiguous().view(n * length, -1)
        arrays = (as_array(pixels), h, w, as_array(offset).reshape(-1),
                  as_array(mask_array).reshape(-1), has_mask,
                  *_plan(x, offset, weight, geometry))
        outputs = (as_array(grad_x.view(n, h * w, c)),
                   as_array(grad_offset).reshape(-1), as_array(grad_mask).reshape(-1))
        lanes = max(1, min(n, torch.get_num_threads()))  # samples in parallel
        rows = _tile_rows(length, groups * k_g, x)
        grad_tiles = x.new_empty(lanes, rows, groups * k_g)
        tiles = torch.empty_like(grad_tiles)
        with kernel_threads(chunk=1):
            for b0 in range(0, n, lanes):
                count = min(lanes, n - b0)
                for l0 in range(0, length, rows):
                    l1 = min(length, l0 + rows)
                    for j, g in itertools.product(range(count), range(groups)):
                        into = grad_tiles[j, : l1 - l0, g * k_g : (g + 1) * k_g]
                        at = (b0 + j) * length
                        torch.mm(grad_rows[at + l0 : at + l1, g * o_g : (g + 1) * o_g],
                                 kernels[g], out=into)
                    _backward_tile(*arrays, b0, count, l0, l1 - l0, as_array(grad_tiles),
                                   *outputs, as_array(tiles))
                    for j, g in itertools.product(range(count), range(groups)):
                        at = (b0 + j) * length
                        grad_kernels[g].addmm_(
                            grad_rows[at + l0 : at + l1, g * o_g : (g + 1) * o_g].t(),
                            tiles[j, : l1 - l0, g * k_g : (g + 1) * k_g])
    o, cg, kh, kw = weight.shape
    grad_weight = grad_kernels.reshape(groups, o_g, kh * kw, cg).transpose(2, 3)
    return grad_x, grad_offset, grad_mask, grad_weight.reshape(weight.shape).contiguous()


@deform_conv2d_backward.register_fake
def _(grad, x, offset, mask, weight, geometry):
    # contiguous, as the real outputs, whatever the inputs' strides
    grad_mask = mask.new_empty(mask.shape) if mask is not None else x.new_empty(1, 1, 1, 1)
    n, c, h, w = x.shape
    return (x.new_empty(n, h, w, c), offset.new_empty(offset.shape), grad_mask,
            weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, offset, mask, weight, geometry, bias = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.geometry = geometry
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, offset, mask, weight = ctx.saved_tensors
    grad_x, grad_offset, grad_mask, grad_weight = deform_conv2d_backward(
        grad, x, offset, mask, weight, ctx.geometry
    )
    grad_bias = grad.sum((0, 1, 2)) if ctx.has_bias else None
    grad_mask = grad_mask if mask is not None else None
    return grad_x.permute(0, 3, 1, 2), grad_offset, grad_mask, grad_weight, None, grad_bias


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
    outside the image (zero sample, zero gradient). Returns ``(N, O, Ho, Wo)`` with
    channels-last strides.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    out = deform_conv2d_op(input, offset, mask, weight, [kh, kw, sh, sw, ph, pw, dh, dw], bias)
    return out.permute(0, 3, 1, 2)
