"""Involution's aggregation as one compiled CPU operator (forward and backward).

Involution: Inverting the Inherence of Convolution for Visual Recognition, Li et al., CVPR 2021,
arXiv 2103.06255

``out[n, c, i, j] = sum_{u, v} kernel[n, g(c), u, v, i, j] * x[n, c, i * s + u - p, j * s + v - p]``
with zero padding ``p = (K - 1) / 2`` (see :func:`blockzoo.blocks.involution.involution2d`).

The kernel may come with its rows padded: ``(N, G, K, K, Ho, Wo + p)``, the last ``p`` values
of each row ignored (they must be finite: they multiply zeros), which the ``Involution`` block
produces at no cost (its last 1x1 conv runs on a map padded by ``p`` zero columns); a plain
``(N, G, K, K, Ho, Wo)`` kernel is padded here (a copy).

Stride 1 runs on flat rows. With the row pitch ``P = W + p``, a copy of input rows with ``p``
zeros before each row (the right padding of a row is the left padding of the next) and ``p``
zero rows above and below holds the value that output ``t = i * P + j`` reads at offset
``(u, v)`` at ``t + u * P + v``, and the kernel's padded rows hold its weight at ``t``. Each
offset is then one contiguous multiply-add over several rows at once (long loops the compiler
vectorises, whatever the map width: rows of 14 values alone would run scalar), and the ``K = 7``
offsets of a kernel row are added in one pass (one accumulator load and store for seven
products: the loop is bound by loads and stores). A job takes a block of rows (a whole plane
for maps up to about 64 x 64) of one channel group and runs the group's channels on the same
kernel rows; the padded input rows are copied into a per-job buffer, so no padded copy of the
input is allocated.

Backward: the kernel gradient per block of output rows (summed over the group's channels in
order), the input gradient per block of input rows (each gathers the products that read it,
offsets in order): every job owns what it writes and every sum runs in a fixed order, so the
results are deterministic. Other strides run row loops on a zero-padded input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._backend import as_array, kernel, kernel_threads, prange

# Values per flat loop (rows per job times the pitch): long loops and few halo rows. Measured
# on 56 x 56 maps, 1 thread: jobs of a whole plane ran the forward and backward passes about
# 1.4 times faster than jobs of 480 values (8 rows, kernel rows closer to the core's caches).
_SPAN = 4096


@kernel(parallel=False)
def _pack_rows(plane, first, count, lead, pitch, dst):  # pragma: no cover - compiled
    """Rows ``first .. first + count - 1`` of ``plane (h, w)`` into the flat ``dst``, row ``r``
    at ``lead + r * pitch``; rows outside the plane and all other values are zeros."""
    h, w = plane.shape
    top, bottom = max(0, -first), max(0, min(count, h - first))
    for q in range(min(lead + top * pitch, dst.shape[0])):
        dst[q] = 0
    for r in range(top, bottom):
        start, row = lead + r * pitch, plane[first + r]
        for j in range(w):
            dst[start + j] = row[j]
        for q in range(start + w, min(start + pitch, dst.shape[0])):
            dst[q] = 0
    for q in range(max(lead + top * pitch, lead + bottom * pitch), dst.shape[0]):
        dst[q] = 0


@kernel(parallel=False)
def _add_one(acc, weight, x, span):  # pragma: no cover - compiled
    for t in range(span):
        acc[t] += weight[t] * x[t]


@kernel(parallel=False)
def _seven_rows(weight, row, start):  # pragma: no cover - compiled
    """Rows ``row .. row + 6`` of ``weight`` from column ``start`` on (views)."""
    return (weight[row, start:], weight[row + 1, start:], weight[row + 2, start:],
            weight[row + 3, start:], weight[row + 4, start:], weight[row + 5, start:],
            weight[row + 6, start:])


@kernel(parallel=False)
def _add_seven(acc, weight, row, start, x, span):  # pragma: no cover - compiled
    """``acc[t] += sum_{v < 7} weight[row + v, start + t] * x[t + v]`` for ``t < span``, added
    in the order of ``v`` (the same sums as seven :func:`_add_one` passes)."""
    w0, w1, w2, w3, w4, w5, w6 = _seven_rows(weight, row, start)
    for t in range(span):
        s = acc[t]
        s += w0[t] * x[t]
        s += w1[t] * x[t + 1]
        s += w2[t] * x[t + 2]
        s += w3[t] * x[t + 3]
        s += w4[t] * x[t + 4]
        s += w5[t] * x[t + 5]
        s += w6[t] * x[t + 6]
        acc[t] = s


@kernel(parallel=False)
def _add_seven_twice(acc, weight, row, start, x, shift, span):  # pragma: no cover - compiled
    """:func:`_add_seven` for two channels at once, ``acc[c]`` and ``x[c, shift:]`` for
    ``c < 2``: each weight loaded once for both."""
    w0, w1, w2, w3, w4, w5, w6 = _seven_rows(weight, row, start)
    a, b, xa, xb = acc[0], acc[1], x[0, shift:], x[1, shift:]
    for t in range(span):
        s, z = a[t], b[t]
        s += w0[t] * xa[t]
        z += w0[t] * xb[t]
        s += w1[t] * xa[t + 1]
        z += w1[t] * xb[t + 1]
        s += w2[t] * xa[t + 2]
        z += w2[t] * xb[t + 2]
        s += w3[t] * xa[t + 3]
        z += w3[t] * xb[t + 3]
        s += w4[t] * xa[t + 4]
        z += w4[t] * xb[t + 4]
        s += w5[t] * xa[t + 5]
        z += w5[t] * xb[t + 5]
        s += w6[t] * xa[t + 6]
        z += w6[t] * xb[t + 6]
        a[t], b[t] = s, z


@kernel(parallel=False)
def _gather_seven(acc, weight, row, start, g, shift, span):  # pragma: no cover - compiled
    """``acc[q] += sum_{v < 7} weight[row + v, start - v + q] * g[shift + start - v + q]`` for
    ``q < span``, added in the order of ``v``."""
    w0, w1, w2, w3 = weight[row, start:], weight[row + 1, start - 1:], \
        weight[row + 2, start - 2:], weight[row + 3, start - 3:]
    w4, w5, w6 = weight[row + 4, start - 4:], weight[row + 5, start - 5:], \
        weight[row + 6, start - 6:]
    g0 = g[shift + start - 6:]
    for q in range(span):
        s = acc[q]
        s += w0[q] * g0[q + 6]
        s += w1[q] * g0[q + 5]
        s += w2[q] * g0[q + 4]
        s += w3[q] * g0[q + 3]
        s += w4[q] * g0[q + 2]
        s += w5[q] * g0[q + 1]
        s += w6[q] * g0[q]
        acc[q] = s


@kernel()
def _forward_flat(x, weight, k, rows, out):  # pragma: no cover - compiled
    """``x (N, C, H, W)``, ``weight (N, G, K * K, H * P)``, ``out (N, C, H, W)``."""
    n, c, h, w = x.shape
    groups, pad = weight.shape[1], (k - 1) // 2
    pitch, cg, blocks = w + pad, c // groups, -(-h // rows)
    for job in prange(n * groups * blocks):
        b, g, block = job // (groups * blocks), (job // blocks) % groups, job % blocks
        i0 = block * rows
        count = min(rows, h - i0)
        span = count * pitch - pad  # up to the last output of the block
        xf = np.empty((2, (rows + 2 * pad) * pitch + pad), x.dtype)
        acc = np.empty((2, rows * pitch), x.dtype)
        for c0 in range(0, cg, 2):  # channels in pairs (when K = 7)
            pair = 2 if k == 7 and c0 + 1 < cg else 1
            for cc in range(c0, min(cg, c0 + 2)):
                _pack_rows(x[b, g * cg + cc], i0 - pad, count + 2 * pad, pad, pitch,
                           xf[cc - c0])
                acc[cc - c0] = 0
            for u in range(k):
                if pair == 2:  # the default size: a kernel row per pass
                    _add_seven_twice(acc, weight[b, g], u * k, i0 * pitch, xf, u * pitch, span)
                    continue
                for cc in range(c0, min(cg, c0 + 2)):
                    if k == 7:
                        _add_seven(acc[cc - c0], weight[b, g], u * k, i0 * pitch,
                                   xf[cc - c0, u * pitch:], span)
                    else:
                        for v in range(k):
                            _add_one(acc[cc - c0], weight[b, g, u * k + v, i0 * pitch:],
                                     xf[cc - c0, u * pitch + v:], span)
            for cc in range(c0, min(cg, c0 + 2)):
                for r in range(count):
                    out[b, g * cg + cc, i0 + r] = acc[cc - c0, r * pitch:r * pitch + w]


@kernel()
def _backward_kernel_flat(grad, x, k, rows, grad_weight):  # pragma: no cover - compiled
    """``grad``, ``x (N, C, H, W)``, ``grad_weight (N, G, K * K, H * P)``."""
    n, c, h, w = x.shape
    groups, kk = grad_weight.shape[1], grad_weight.shape[2]
    pad = (k - 1) // 2
    pitch, cg, blocks = w + pad, c // groups, -(-h // rows)
    for job in prange(n * groups * blocks):
        b, g, block = job // (groups * blocks), (job // blocks) % groups, job % blocks
        i0 = block * rows
        count = min(rows, h - i0)
        span = count * pitch - pad
        for uv in range(kk):
            grad_weight[b, g, uv, i0 * pitch:(i0 + count) * pitch] = 0
        xf = np.empty((rows + 2 * pad) * pitch + pad, x.dtype)
        gf = np.empty(rows * pitch, x.dtype)
        for cc in range(cg):
            ch = g * cg + cc
            _pack_rows(x[b, ch], i0 - pad, count + 2 * pad, pad, pitch, xf)
            _pack_rows(grad[b, ch], i0, count, 0, pitch, gf)
            for uv in range(kk):
                _add_one(grad_weight[b, g, uv, i0 * pitch:], gf,
                         xf[(uv // k) * pitch + uv % k:], span)
        for uv in range(kk):  # the padding columns: products with zeros, set exactly
            for r in range(i0, i0 + count):
                grad_weight[b, g, uv, r * pitch + w:(r + 1) * pitch] = 0


@kernel()
def _backward_input_flat(grad, weight, k, rows, grad_x):  # pragma: no cover - compiled
    """``grad``, ``grad_x (N, C, H, W)``, ``weight (N, G, K * K, H * P)``."""
    n, c, h, w = grad_x.shape
    groups, pad = weight.shape[1], (k - 1) // 2
    pitch, cg, blocks = w + pad, c // groups, -(-h // rows)
    size = h * pitch
    for job in prange(n * groups * blocks):
        b, g, block = job // (groups * blocks), (job // blocks) % groups, job % blocks
        y0 = block * rows
        count = min(rows, h - y0)
        # grad rows y0 - pad ... after k - 1 zeros: output t is at t + shift
        gf = np.empty(k - 1 + (rows + 2 * pad) * pitch, grad.dtype)
        shift = k - 1 - (y0 - pad) * pitch
        gx = np.empty(rows * pitch, grad.dtype)
        for cc in range(cg):
            ch = g * cg + cc
            _pack_rows(grad[b, ch], y0 - pad, count + 2 * pad, k - 1, pitch, gf)
            gx[:] = 0
            for u in range(k):
                # padded input position (y0 + pad) * pitch + q is read by output t = base + q
                # at offset (u, 0), by t - v at (u, v): t - v must lie in [0, size)
                base = (y0 + pad - u) * pitch
                lo, hi = max(0, k - 1 - base), min(count * pitch, size - base)
                if k != 7 or hi <= lo:
                    lo = hi = 0
                else:
                    _gather_seven(gx[lo:], weight[b, g], u * k, base + lo, gf, shift, hi - lo)
                for v in range(k):  # the rest, for each position in the order of v
                    first, last = max(0, v - base), min(count * pitch, size - base + v)
                    for a, z in ((first, min(last, lo)), (max(first, hi), last)):
                        if z > a:
                            t = base - v + a
                            _add_one(gx[a:], weight[b, g, u * k + v, t:], gf[shift + t:], z - a)
            for r in range(count):
                grad_x[b, ch, y0 + r] = gx[r * pitch + pad:r * pitch + pad + w]


@kernel()
def _forward_rows(xp, weight, stride, out):  # pragma: no cover - compiled
    n, c = xp.shape[0], xp.shape[1]
    groups, k, ho, wo = weight.shape[1], weight.shape[2], out.shape[2], out.shape[3]
    cg = c // groups
    for job in prange(n * groups * ho):
        b, g, i = job // (groups * ho), (job // ho) % groups, job % ho
        for cc in range(cg):
            ch = g * cg + cc
            row = out[b, ch, i]
            row[:] = 0
            for u in range(k):
                xrow = xp[b, ch, i * stride + u]
                for v in range(k):
                    wrow = weight[b, g, u, v, i]
                    for j in range(wo):
                        row[j] += wrow[j] * xrow[j * stride + v]


@kernel()
def _backward_input_rows(grad, weight, stride, grad_xp):  # pragma: no cover - compiled
    n, c, hp = grad_xp.shape[0], grad_xp.shape[1], grad_xp.shape[2]
    groups, k, ho, wo = weight.shape[1], weight.shape[2], grad.shape[2], grad.shape[3]
    cg = c // groups
    for job in prange(n * groups * hp):
        b, g, y = job // (groups * hp), (job // hp) % groups, job % hp
        for cc in range(cg):
            ch = g * cg + cc
            row = grad_xp[b, ch, y]
            row[:] = 0
            for u in range(k):
                if (y - u) % stride != 0 or y < u or (y - u) // stride >= ho:
                    continue
                i = (y - u) // stride
                grow = grad[b, ch, i]
                for v in range(k):
                    wrow = weight[b, g, u, v, i]
                    for j in range(wo):
                        row[j * stride + v] += wrow[j] * grow[j]


@kernel()
def _backward_kernel_rows(grad, xp, stride, grad_weight):  # pragma: no cover - compiled
    n, c = xp.shape[0], xp.shape[1]
    groups, k = grad_weight.shape[1], grad_weight.shape[2]
    ho, wo = grad.shape[2], grad.shape[3]
    cg = c // groups
    for job in prange(n * groups * ho):
        b, g, i = job // (groups * ho), (job // ho) % groups, job % ho
        for u in range(k):
            for v in range(k):
                grad_weight[b, g, u, v, i, :] = 0
        for cc in range(cg):
            ch = g * cg + cc
            grow = grad[b, ch, i]
            for u in range(k):
                xrow = xp[b, ch, i * stride + u]
                for v in range(k):
                    gwrow = grad_weight[b, g, u, v, i]
                    for j in range(wo):
                        gwrow[j] += grow[j] * xrow[j * stride + v]


def _padded(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """Zero padding for the row loops: ``(N, C, stride * Ho + k - 1, stride * Wo + k - 1)``."""
    p, h, w = (k - 1) // 2, x.shape[2], x.shape[3]
    return F.pad(x, (p, p + (-w) % stride, p, p + (-h) % stride))


def _output_shape(x: torch.Tensor, stride: int) -> tuple[int, int, int, int]:
    return x.shape[0], x.shape[1], -(-x.shape[2] // stride), -(-x.shape[3] // stride)


def _padded_rows(weight: torch.Tensor, wo: int) -> torch.Tensor:
    """The kernel with rows of ``wo + p`` values (a copy unless they are already)."""
    extra = wo + weight.shape[2] // 2 - weight.shape[5]
    return F.pad(weight, (0, extra)).contiguous() if extra else weight.contiguous()


def _rows_per_job(rows: int, pitch: int) -> int:
    return max(1, min(rows, -(-_SPAN // pitch)))


@torch.library.custom_op("blockzoo::involution_aggregate", mutates_args=())
def involution_aggregate(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """``x (N, C, H, W)``, kernel ``(N, G, K, K, Ho, Wo)`` or ``(N, G, K, K, Ho, Wo + p)`` (rows
    padded by ``p = (K - 1) / 2`` ignored values) -> ``(N, C, Ho, Wo)``, ``Ho = ceil(H / stride)``
    (CPU, float32/float64, equal dtypes)."""
    x = x.contiguous()
    out = x.new_empty(_output_shape(x, stride))
    if out.numel():
        k = weight.shape[2]
        with kernel_threads():
            if stride == 1:
                rows = _padded_rows(weight, x.shape[3]).flatten(2, 3).flatten(3)
                _forward_flat(as_array(x), as_array(rows), k,
                              _rows_per_job(x.shape[2], x.shape[3] + k // 2), as_array(out))
            else:
                xp = _padded(x, k, stride)
                _forward_rows(as_array(xp), as_array(weight.contiguous()), stride,
                              as_array(out))
    return out


@involution_aggregate.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    return x.new_empty(_output_shape(x, stride))


def _empty_gradients(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    contiguous = torch.contiguous_format
    return (torch.empty_like(x, memory_format=contiguous),
            torch.empty_like(weight, memory_format=contiguous))


@torch.library.custom_op("blockzoo::involution_aggregate_backward", mutates_args=())
def involution_aggregate_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`involution_aggregate` to ``x`` and to the kernel (zero in the
    ignored row padding)."""
    grad, x = grad.contiguous(), x.contiguous()
    grad_x, grad_weight = _empty_gradients(x, weight)
    if not (grad.numel() and grad_x.numel() and grad_weight.numel()):
        return grad_x.zero_(), grad_weight.zero_()
    k, p = weight.shape[2], weight.shape[2] // 2
    with kernel_threads():
        if stride == 1:
            rows = _padded_rows(weight, x.shape[3])
            grad_rows = grad_weight if rows.shape == weight.shape else torch.empty_like(rows)
            count = _rows_per_job(x.shape[2], x.shape[3] + p)
            _backward_input_flat(as_array(grad), as_array(rows.flatten(2, 3).flatten(3)), k,
                                 count, as_array(grad_x))
            _backward_kernel_flat(as_array(grad), as_array(x), k, count,
                                  as_array(grad_rows.flatten(2, 3).flatten(3)))
            if grad_rows is not grad_weight:
                grad_weight.copy_(grad_rows[..., :x.shape[3]])
        else:
            xp = _padded(x, k, stride)
            grad_xp = torch.empty_like(xp)
            weight = weight.contiguous()
            _backward_input_rows(as_array(grad), as_array(weight), stride, as_array(grad_xp))
            _backward_kernel_rows(as_array(grad), as_array(xp), stride, as_array(grad_weight))
            grad_x.copy_(grad_xp[:, :, p:p + x.shape[2], p:p + x.shape[3]])
    return grad_x, grad_weight


@involution_aggregate_backward.register_fake
def _(grad, x, weight, stride):
    return _empty_gradients(x, weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride = stride


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = involution_aggregate_backward(grad, x, weight, ctx.stride)
    return grad_x, grad_weight, None


involution_aggregate.register_autograd(_backward, setup_context=_setup_context)
