"""ACmix's convolution path: a grouped convolution as one operator, with a compiled CPU forward.

On the Integration of Self-Attention and Convolution, Pan et al., CVPR 2022, arXiv 2111.14556

``out[n, o, i, j] = sum_{c < Cg} sum_{u, v < K} weight[o, c, u, v] * x[n, g Cg + c, i + u - p,
j + v - p]`` for output channel ``o`` of group ``g = o // Og``: ``x (N, G * Cg, H, W)`` and
``weight (G * Og, Cg, K, K)`` planar (contiguous), zero padding ``p = (K - 1) / 2`` (odd ``K``),
stride 1 -> ``(N, G * Og, H, W)``. ACmix's fused path runs it on the projection tensor ``qkv``
(``Cg = 3 * heads`` channels in, ``Og = 4`` out by default); other strides and paddings run
``F.conv2d``.

The kernel runs on flat rows, as the involution kernel does (:mod:`blockzoo.ops.involution`):
with the pitch ``P = W + p``, a copy of the input rows with ``p`` zeros before each row and ``p``
zero rows above and below holds what output ``t = i * P + j`` reads at tap ``(u, v)`` at
``t + u * P + v``, so every tap is one constant offset and every loop runs over several rows at
once (vectorised whatever the map width). A job takes a group and a block of rows of one sample,
or, for small maps, whole planes of several samples stacked with ``p`` zero rows between them
(long loops on 14 x 14 maps too). It copies one input channel at a time into that layout (the
zeros are written once per job) and adds the channel's taps into the output channels'
accumulators, ``K = 3``: four output channels per kernel row in one pass (each shifted load
feeds four multiply-adds, the twelve weights are scalars), then pairs and single channels over
all nine taps; other ``K``: one tap at a time. Every job owns its outputs and every sum runs in
the same fixed order (input channels, then taps row-major), whatever the blocking or the
number of threads, so the results are deterministic. The backward pass is PyTorch's
(``aten.convolution_backward``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._backend import as_array, kernel, kernel_threads, prange, use_fast_path

# Values per flat loop (rows per job times the pitch): the accumulators of a job's four output
# channels and one copied input channel stay in the core's first-level cache. Measured on
# 8 x 192 x 56 x 56 -> 64, 1 thread: jobs of 28 rows ran faster than of 14 or 56 rows.
_SPAN = 2048
# Values per job of whole small planes stacked: measured on 32 x 768 x 14 x 14 -> 256, 1 thread,
# stacks of 4 planes (about 1024 values) ran faster than of 9 (2048) or of 1 or 2.
_STACK = 1024


@kernel(parallel=False)
def _add_row_four(a, b, c, d, wa, wb, wc, wd, x, span):  # pragma: no cover - compiled
    """``a[t] += sum_{v < 3} wa[v] * x[t + v]`` and the same for ``b, c, d`` with ``wb, wc, wd``
    for ``t < span``, in the order of ``v`` (each load feeds four multiply-adds)."""
    a0, a1, a2, b0, b1, b2 = wa[0], wa[1], wa[2], wb[0], wb[1], wb[2]
    c0, c1, c2, d0, d1, d2 = wc[0], wc[1], wc[2], wd[0], wd[1], wd[2]
    for t in range(span):
        p, q, r, s = a[t], b[t], c[t], d[t]
        v = x[t]
        p += a0 * v
        q += b0 * v
        r += c0 * v
        s += d0 * v
        v = x[t + 1]
        p += a1 * v
        q += b1 * v
        r += c1 * v
        s += d1 * v
        v = x[t + 2]
        p += a2 * v
        q += b2 * v
        r += c2 * v
        s += d2 * v
        a[t], b[t], c[t], d[t] = p, q, r, s


@kernel(parallel=False)
def _add_nine_twice(a, b, wa, wb, x, pitch, span):  # pragma: no cover - compiled
    """``a[t] += sum_{u, v < 3} wa[u, v] * x[t + u * pitch + v]`` and the same for ``b`` with
    ``wb``, for ``t < span``, the taps added in row-major order (each load feeds both)."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = (wa[0, 0], wa[0, 1], wa[0, 2], wa[1, 0], wa[1, 1],
                                          wa[1, 2], wa[2, 0], wa[2, 1], wa[2, 2])
    b0, b1, b2, b3, b4, b5, b6, b7, b8 = (wb[0, 0], wb[0, 1], wb[0, 2], wb[1, 0], wb[1, 1],
                                          wb[1, 2], wb[2, 0], wb[2, 1], wb[2, 2])
    x1, x2 = x[pitch:], x[2 * pitch:]
    for t in range(span):
        s, z = a[t], b[t]
        v = x[t]
        s += a0 * v
        z += b0 * v
        v = x[t + 1]
        s += a1 * v
        z += b1 * v
        v = x[t + 2]
        s += a2 * v
        z += b2 * v
        v = x1[t]
        s += a3 * v
        z += b3 * v
        v = x1[t + 1]
        s += a4 * v
        z += b4 * v
        v = x1[t + 2]
        s += a5 * v
        z += b5 * v
        v = x2[t]
        s += a6 * v
        z += b6 * v
        v = x2[t + 1]
        s += a7 * v
        z += b7 * v
        v = x2[t + 2]
        s += a8 * v
        z += b8 * v
        a[t], b[t] = s, z


@kernel(parallel=False)
def _add_nine(a, wa, x, pitch, span):  # pragma: no cover - compiled
    """:func:`_add_nine_twice` for one output channel."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = (wa[0, 0], wa[0, 1], wa[0, 2], wa[1, 0], wa[1, 1],
                                          wa[1, 2], wa[2, 0], wa[2, 1], wa[2, 2])
    x1, x2 = x[pitch:], x[2 * pitch:]
    for t in range(span):
        s = a[t]
        s += a0 * x[t]
        s += a1 * x[t + 1]
        s += a2 * x[t + 2]
        s += a3 * x1[t]
        s += a4 * x1[t + 1]
        s += a5 * x1[t + 2]
        s += a6 * x2[t]
        s += a7 * x2[t + 1]
        s += a8 * x2[t + 2]
        a[t] = s


@kernel(parallel=False)
def _add_tap(acc, weight, x, span):  # pragma: no cover - compiled
    """``acc[t] += weight * x[t]`` for ``t < span``."""
    for t in range(span):
        acc[t] += weight * x[t]


@kernel(parallel=False)
def _copy_rows(src, first, last, dst, start, pitch, width):  # pragma: no cover - compiled
    """``dst[start + (r - first) * pitch + j] = src[r, j]`` for rows ``first <= r < last`` and
    ``j < width`` (the rest of ``dst`` is left as it is)."""
    for r in range(first, last):
        row, to = src[r], dst[start + (r - first) * pitch:]  # views: no index wrap checks
        for j in range(width):
            to[j] = row[j]


@kernel()
def _forward_flat(x, weight, rows, samples, out):  # pragma: no cover - compiled
    """``x (N, G * Cg, H, W)``, ``weight (G * Og, Cg, K, K)``, ``out (N, G * Og, H, W)``; a job
    takes ``rows`` rows of one sample, or (``rows = H``) whole planes of ``samples`` samples."""
    n, c, h, width = x.shape
    cout, cg, k = weight.shape[0], weight.shape[1], weight.shape[2]
    groups = c // cg
    og, pad = cout // groups, (k - 1) // 2
    pitch, blocks, stacks = width + pad, -(-h // rows), -(-n // samples)
    quads = og - og % 4 if k == 3 else 0  # output channels taken four, then two at a time
    pairs = quads + (og - quads) // 2 * 2 if k == 3 else 0
    for job in prange(stacks * groups * blocks):
        stack, g, block = job // (groups * blocks), (job // blocks) % groups, job % blocks
        b0, i0 = stack * samples, block * rows
        nb, count = min(samples, n - b0), min(rows, h - i0)
        # input rows i0 - pad .. i0 + count + pad - 1 of sample b0 + s, row r at
        # pad + (s * step + r - i0 + pad) * pitch: samples one above the other, ``pad`` rows
        # of zeros between them (whole planes), which are never overwritten
        step = count + pad
        span = (nb * step - pad) * pitch - pad  # up to the last output of the job
        first, last = max(0, i0 - pad), min(h, i0 + count + pad)
        xf = np.zeros((samples * (rows + pad) + pad) * pitch + pad, x.dtype)
        acc = np.zeros((og, samples * (rows + pad) * pitch), x.dtype)
        w = weight[g * og:(g + 1) * og]
        for cc in range(cg):
            for s in range(nb):
                _copy_rows(x[b0 + s, g * cg + cc], first, last, xf,
                           pad + (s * step + first - i0 + pad) * pitch, pitch, width)
            for o in range(0, quads, 4):
                for u in range(3):
                    _add_row_four(acc[o], acc[o + 1], acc[o + 2], acc[o + 3], w[o, cc, u],
                                  w[o + 1, cc, u], w[o + 2, cc, u], w[o + 3, cc, u],
                                  xf[u * pitch:], span)
            for o in range(quads, pairs, 2):
                _add_nine_twice(acc[o], acc[o + 1], w[o, cc], w[o + 1, cc], xf, pitch, span)
            for o in range(pairs, og):
                if k == 3:
                    _add_nine(acc[o], w[o, cc], xf, pitch, span)
                    continue
                for u in range(k):
                    for v in range(k):
                        _add_tap(acc[o], w[o, cc, u, v], xf[u * pitch + v:], span)
        for s in range(nb):
            for o in range(og):
                plane = out[b0 + s, g * og + o]
                for r in range(count):
                    row, src = plane[i0 + r], acc[o, (s * step + r) * pitch:]
                    for j in range(width):
                        row[j] = src[j]


def _blocking(n: int, h: int, pitch: int, pad: int) -> tuple[int, int]:
    """Rows and samples per job: blocks of about ``_SPAN`` values, rows shared out evenly
    among the blocks of a plane, or whole small planes of several samples (``_STACK``)."""
    if h * pitch >= _SPAN:
        blocks = -(-h * pitch // _SPAN)
        return -(-h // blocks), 1
    return h, max(1, min(n, _STACK // ((h + pad) * pitch)))


def _runs_compiled(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                   groups: int) -> bool:
    """Whether the call fits the compiled kernel (anything else, errors included, goes to
    ``F.conv2d``)."""
    k = weight.shape[-1]
    return (
        x.dim() == 4 and weight.dim() == 4 and stride == 1 and k % 2 == 1
        and weight.shape[-2] == k and padding == k // 2 and groups > 0 and weight.shape[1] > 0
        and x.shape[1] == groups * weight.shape[1] and weight.shape[0] % groups == 0
        and use_fast_path(x, weight)
    )


@torch.library.custom_op("blockzoo::grouped_conv2d", mutates_args=())
def grouped_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int
) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, groups=groups)`` as one opaque operator.

    ACmix's convolution path reads the attention operator's planar ``qkv`` tensor. Written as an
    ``aten.convolution``, ``torch.compile`` on CPU lays every convolution's input and output out
    channels-last, which costs copies of ``qkv`` and of the output around the attention operator
    (measured slower than eager); behind a custom operator the tensors stay planar. Stride 1
    with ``padding = (K - 1) / 2`` (odd square ``K``) on CPU float32/float64 runs the compiled
    kernel; everything else ``F.conv2d``. The output is contiguous.
    """
    if not _runs_compiled(x, weight, stride, padding, groups):
        return F.conv2d(x, weight, None, stride, padding, 1, groups).contiguous()
    x, weight = x.contiguous(), weight.contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if out.numel():
        rows, samples = _blocking(x.shape[0], x.shape[2], x.shape[3] + padding, padding)
        with kernel_threads(chunk=1):  # jobs handed out one at a time: a busy core holds up none
            _forward_flat(as_array(x), as_array(weight), rows, samples, as_array(out))
    return out


@grouped_conv2d.register_fake
def _(x, weight, stride, padding, groups):
    n, _, h, w = x.shape
    k = weight.shape[-1]
    size = lambda m: (m + 2 * padding - k) // stride + 1  # noqa: E731
    return x.new_empty(n, weight.shape[0], size(h), size(w))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, groups)


def _backward(ctx, grad):
    """Both gradients on channels-last copies: oneDNN's grouped weight gradient on planar
    tensors measured 2-4x slower than the copies and the channels-last pass together."""
    x, weight = ctx.saved_tensors
    stride, padding, groups = ctx.geometry
    last = torch.channels_last
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=last), x.contiguous(memory_format=last), weight, None,
        [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
    )
    return None if grad_x is None else grad_x.contiguous(), grad_weight, None, None, None


grouped_conv2d.register_autograd(_backward, setup_context=_setup_context)
