"""ACmix's local window attention as one compiled CPU operator (forward and backward).

On the Integration of Self-Attention and Convolution, Pan et al., CVPR 2022, arXiv 2111.14556

The operator reads ``q``, ``k`` and ``v`` from one projection tensor ``qkv`` of shape
``(B, D, 3, heads, H, W)`` (the layout the ACmix block's fused 1x1 projection writes, so that its
convolution path reads the same tensor) and a position encoding ``pe`` ``(D, H, W)``. With
``keys = pad(k - pe)`` and ``values = pad(v)`` (reflection padding by ``dilation * (K - 1) / 2``,
iterated for inputs smaller than the window: the index tables ``rows``/``cols``), for each output
position ``(i, j)`` and window tap ``t = (u, r)`` (row-major, ``T = K * K``)::

    score[b, h, t, i, j] = scale * sum_d q[b, d, h, i*s, j*s] * keys[b, d, h, y, x]
    att = softmax over t of score
    out[b, h, d, i, j] = sum_t att[b, h, t, i, j] * values[b, d, h, y, x]

with ``(y, x) = (i*s + u*dil, j*s + r*dil)`` in padded coordinates.

Nothing padded is stored: each job (a sample, a head and a block of output rows) copies the rows
it reads into small buffers, where a stride-1 window tap is one constant offset into the padded,
flattened rows, so every inner loop runs over a contiguous stretch of several rows. The backward
pass recomputes those buffers, forms the score gradients and the gradient to ``q`` per block, and
scatters the key and value gradients into the block's padded rows, folded back through the
reflection into ``k``'s and ``v``'s gradients. Blocks of the same parity never touch the same
rows (a block is at least as tall as the padding on both sides), so the two parities run one after
the other: every element is written in a fixed order and the result is deterministic. The
attention weights are recomputed there rather than stored; nothing of size ``B * D * T * Ho * Wo``
is ever held.

The forward pass normalises late: a block's exponentials stay unnormalised and each weighted sum
is multiplied by one over their sum as it is stored. ACmix's default window (7 x 7, stride 1,
dilation 1) has a forward path of its own (:func:`_forward_rows`): a job copies the padded key
and value rows of up to ``_CHUNK_BLOCKS`` blocks once, and the scores and weighted sums run a
window row of seven taps for eight channels at a time (see the comment above
:func:`_row_scores8`); other geometries take the general sweeps. Both give the same results up
to rounding, each bitwise the same for any thread count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_array, kernel, kernel_threads, numba, prange

# Flattened length of a block of output rows: the ``T`` score rows of a block stay in cache. In
# the forward pass it is also the (compile-time) pitch of the rows of the score, query and output
# buffers, so that one pointer and constant offsets address a row of window taps.
_FORWARD_LENGTH = 320
_BACKWARD_LENGTH = 384
_CHUNK_BLOCKS = 4  # forward jobs of up to 4 blocks, while there are 8 jobs for each thread
_JOBS_PER_THREAD = 8
# Taylor terms of exp on [-ln 2 / 2, ln 2 / 2]: 8 in float32 (truncation error below 1e-8, a tenth
# of an ulp), 12 in float64 (below 1e-14).
_EXP_TERMS = 12
_MIN_EXPONENT = 125  # scores below the maximum by more than 125 ln 2 get weight 0
# ln 2 in two parts (Cody and Waite): ``n * ln2_hi`` is exact for ``|n| <= 2^8``.
_LN2_HI = {torch.float32: 0.693145751953125, torch.float64: 6.93147180369123816490e-01}
_LN2_LO = {torch.float32: 1.428606765330187e-06, torch.float64: 1.90821492927058770002e-10}


def _exp_constants(dtype: torch.dtype) -> np.ndarray:
    """``log2 e``, ``ln 2`` (high and low part), ``1 / k!`` for ``k < _EXP_TERMS``, the smallest
    argument, and the other constants of the exponential in the data's dtype (a Python float
    would make numba compute in float64)."""
    wide = dtype != torch.float32
    values = [math.log2(math.e), _LN2_HI[torch.float64 if wide else torch.float32],
              _LN2_LO[torch.float64 if wide else torch.float32],
              *(1 / math.factorial(k) for k in range(_EXP_TERMS)),
              -_MIN_EXPONENT * math.log(2), 0.5, -_MIN_EXPONENT, 0.0, 1.0]
    return np.array(values, dtype=np.float64 if wide else np.float32)


if numba is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _pow2(typingctx, n, like):
        """``2.0 ** n`` in the float type of ``like``, built from its exponent bits (``n`` in
        the normal range), so that loops around it vectorise."""
        if not isinstance(n, types.Integer) or not isinstance(like, types.Float):
            return None

        def codegen(context, builder, signature, args):
            width = like.bitwidth
            bias, shift = (127, 23) if width == 32 else (1023, 52)
            itype = ir.IntType(width)
            value = args[0]
            if n.bitwidth > width:
                value = builder.trunc(value, itype)
            elif n.bitwidth < width:
                value = builder.sext(value, itype)
            value = builder.shl(builder.add(value, ir.Constant(itype, bias)),
                                ir.Constant(itype, shift))
            return builder.bitcast(value, ir.FloatType() if width == 32 else ir.DoubleType())

        return like(n, like), codegen

    @intrinsic
    def _single(typingctx, like):
        """Whether ``like`` is a float32 (a constant of the compiled code)."""
        if not isinstance(like, types.Float):
            return None

        def codegen(context, builder, signature, args):
            return context.get_constant(types.boolean, like.bitwidth == 32)

        return types.boolean(like), codegen
else:  # pragma: no cover - the kernels never run without numba
    def _pow2(n, like):
        return 2.0**n

    def _single(like):
        return isinstance(like, np.float32)


@kernel(parallel=False)
def _exp_terms(consts):  # pragma: no cover - compiled
    """The constants of :func:`_exp` as a tuple of scalars: read once, outside the loops (loads
    from ``consts`` inside a loop that stores would be repeated in every iteration)."""
    return (consts[0], consts[1], consts[2], consts[_EXP_TERMS + 3], consts[_EXP_TERMS + 4],
            consts[_EXP_TERMS + 5], consts[_EXP_TERMS + 6], consts[3], consts[4], consts[5],
            consts[6], consts[7], consts[8], consts[9], consts[10], consts[11], consts[12],
            consts[13], consts[14])


@kernel(parallel=False)
def _exp(x, terms):  # pragma: no cover - compiled
    """``exp(x)`` for ``x <= 0`` (or NaN), vectorisable (``terms``: :func:`_exp_terms`):
    ``x = n ln 2 + r``, ``exp(x) = 2^n * poly(r)``, with ``_EXP_TERMS`` Taylor terms in float64
    and 8 in float32; below ``-125 ln 2`` (and ``-inf``) exactly 0, so that a zero weight times
    an infinite value is NaN as in torch; NaN stays NaN."""
    log2e, ln2_hi, ln2_lo, lowest, half, bottom, zero = terms[:7]
    small = x < lowest
    x = x if not small else lowest
    n = np.floor(x * log2e + half)
    n = n if n >= bottom else bottom
    n = n if n <= zero else zero
    r = (x - n * ln2_hi) - n * ln2_lo
    if _single(x):
        poly = terms[14]
    else:
        poly = (((terms[18] * r + terms[17]) * r + terms[16]) * r + terms[15]) * r + terms[14]
    poly = (((poly * r + terms[13]) * r + terms[12]) * r + terms[11]) * r + terms[10]
    poly = ((poly * r + terms[9]) * r + terms[8]) * r + terms[7]
    return poly * _pow2(np.int32(n), x) if not small else zero


@kernel(parallel=False)
def _exponentials(s, margin, length, consts, top, total):  # pragma: no cover - compiled
    """The unnormalised softmax of the rows of ``s[:, margin:margin + length]``: each row
    becomes ``exp(row - max over rows)`` (NaN spreads over its column, as in torch) and ``total``
    one over the column sums (:func:`_exp`)."""
    first = s[0, margin:]
    for p in range(length):
        top[p] = first[p]
        total[p] = 0
    for t in range(1, s.shape[0]):
        row = s[t, margin:]
        for p in range(length):
            if row[p] > top[p]:
                top[p] = row[p]
    terms = _exp_terms(consts)
    for t in range(s.shape[0]):
        row = s[t, margin:]
        for p in range(length):
            e = _exp(row[p] - top[p], terms)
            row[p] = e
            total[p] += e
    one = consts[_EXP_TERMS + 7]
    for p in range(length):
        total[p] = one / total[p]


@kernel(parallel=False)
def _softmax(s, margin, length, consts, top, total):  # pragma: no cover - compiled
    """Softmax over the rows of ``s[:, margin:margin + length]`` (:func:`_exponentials`)."""
    _exponentials(s, margin, length, consts, top, total)
    for t in range(s.shape[0]):
        row = s[t, margin:]
        for p in range(length):
            row[p] *= total[p]


@kernel(parallel=False)
def _dot8(dst, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
          length):  # pragma: no cover - compiled
    """``dst[p] += sum_i a_i[p] * b_i[p]``: eight products per load and store of ``dst``
    (measured 2.5-4x faster per product than one or four)."""
    for p in range(length):
        dst[p] += (a0[p] * b0[p] + a1[p] * b1[p] + a2[p] * b2[p] + a3[p] * b3[p]
                   + a4[p] * b4[p] + a5[p] * b5[p] + a6[p] * b6[p] + a7[p] * b7[p])


@kernel(parallel=False)
def _dot1(dst, a, b, length):  # pragma: no cover - compiled
    for p in range(length):
        dst[p] += a[p] * b[p]


@kernel(parallel=False)
def _tap(size, dilation, wp, t):  # pragma: no cover - compiled
    """Flat offset of window tap ``t`` in rows of pitch ``wp``."""
    return (t // size) * dilation * wp + (t % size) * dilation


# The three stride-1 sweeps below call ``_dot8`` on slices made in place (groups of eight
# channels or taps, then one by one): a helper returning the slices would make every call count
# references, several times slower than the arithmetic.


@kernel(parallel=False)
def _correlate(dst, a, b, margin, size, dilation, wp, length):  # pragma: no cover - compiled
    """``dst[t, margin + p] += sum_c a[c, margin + p] * b[c, tap(t) + p]``."""
    d = a.shape[0]
    full = d - d % 8
    for c in range(0, full, 8):
        a0, a1, a2, a3 = a[c, margin:], a[c + 1, margin:], a[c + 2, margin:], a[c + 3, margin:]
        a4, a5, a6, a7 = a[c + 4, margin:], a[c + 5, margin:], a[c + 6, margin:], a[c + 7, margin:]
        for t in range(dst.shape[0]):
            o = _tap(size, dilation, wp, t)
            _dot8(dst[t, margin:], a0, a1, a2, a3, a4, a5, a6, a7, b[c, o:], b[c + 1, o:],
                  b[c + 2, o:], b[c + 3, o:], b[c + 4, o:], b[c + 5, o:], b[c + 6, o:],
                  b[c + 7, o:], length)
    for c in range(full, d):
        for t in range(dst.shape[0]):
            _dot1(dst[t, margin:], a[c, margin:], b[c, _tap(size, dilation, wp, t):], length)


@kernel(parallel=False)
def _window_sum(dst, weights, plane, margin, size, dilation, wp,
                length):  # pragma: no cover - compiled
    """``dst[p] = sum_t weights[t, margin + p] * plane[tap(t) + p]``."""
    taps = weights.shape[0]
    full = taps - taps % 8
    dst[:length] = 0
    for t in range(0, full, 8):
        o0, o1 = _tap(size, dilation, wp, t), _tap(size, dilation, wp, t + 1)
        o2, o3 = _tap(size, dilation, wp, t + 2), _tap(size, dilation, wp, t + 3)
        o4, o5 = _tap(size, dilation, wp, t + 4), _tap(size, dilation, wp, t + 5)
        o6, o7 = _tap(size, dilation, wp, t + 6), _tap(size, dilation, wp, t + 7)
        _dot8(dst, weights[t, margin:], weights[t + 1, margin:], weights[t + 2, margin:],
              weights[t + 3, margin:], weights[t + 4, margin:], weights[t + 5, margin:],
              weights[t + 6, margin:], weights[t + 7, margin:], plane[o0:], plane[o1:],
              plane[o2:], plane[o3:], plane[o4:], plane[o5:], plane[o6:], plane[o7:], length)
    for t in range(full, taps):
        _dot1(dst, weights[t, margin:], plane[_tap(size, dilation, wp, t):], length)


# The forward pass with 7 x 7 windows, stride 1 and dilation 1 (ACmix's default) sweeps a row
# of seven taps for eight channels at once: every load of a query or of a weight serves seven
# taps, every store of a score or of an output eight products or more (the sweeps above load and
# store their destination once per eight products). The score, query and output buffers are
# flat, their rows ``_PITCH`` apart: a constant of the compiled code, so that one pointer and
# constant offsets address all seven rows (with a run-time pitch the loops do not vectorise).
# Key and value rows are slices; ``o`` is the flat offset of the window row's first tap.
_PITCH = _FORWARD_LENGTH
_ROW = 7  # taps of a window row on this path


@kernel(parallel=False)
def _row_scores8(s, q, k, c, u, o, length):  # pragma: no cover - compiled
    """``s[(7u + r) * _PITCH + p] += sum_i q[(c + i) * _PITCH + p] * k[c + i, o + r + p]`` for
    ``i < 8``, ``r < 7``: window row ``u``."""
    k0, k1, k2, k3 = k[c, o:], k[c + 1, o:], k[c + 2, o:], k[c + 3, o:]
    k4, k5, k6, k7 = k[c + 4, o:], k[c + 5, o:], k[c + 6, o:], k[c + 7, o:]
    qc, dst = q[c * _PITCH:], s[_ROW * u * _PITCH:]
    for p in range(length):
        q0, q1, q2, q3 = qc[p], qc[_PITCH + p], qc[2 * _PITCH + p], qc[3 * _PITCH + p]
        q4, q5 = qc[4 * _PITCH + p], qc[5 * _PITCH + p]
        q6, q7 = qc[6 * _PITCH + p], qc[7 * _PITCH + p]
        a0 = (q0 * k0[p] + q1 * k1[p] + q2 * k2[p] + q3 * k3[p] + q4 * k4[p] + q5 * k5[p]
              + q6 * k6[p] + q7 * k7[p])
        a1 = (q0 * k0[p + 1] + q1 * k1[p + 1] + q2 * k2[p + 1] + q3 * k3[p + 1]
              + q4 * k4[p + 1] + q5 * k5[p + 1] + q6 * k6[p + 1] + q7 * k7[p + 1])
        a2 = (q0 * k0[p + 2] + q1 * k1[p + 2] + q2 * k2[p + 2] + q3 * k3[p + 2]
              + q4 * k4[p + 2] + q5 * k5[p + 2] + q6 * k6[p + 2] + q7 * k7[p + 2])
        a3 = (q0 * k0[p + 3] + q1 * k1[p + 3] + q2 * k2[p + 3] + q3 * k3[p + 3]
              + q4 * k4[p + 3] + q5 * k5[p + 3] + q6 * k6[p + 3] + q7 * k7[p + 3])
        a4 = (q0 * k0[p + 4] + q1 * k1[p + 4] + q2 * k2[p + 4] + q3 * k3[p + 4]
              + q4 * k4[p + 4] + q5 * k5[p + 4] + q6 * k6[p + 4] + q7 * k7[p + 4])
        a5 = (q0 * k0[p + 5] + q1 * k1[p + 5] + q2 * k2[p + 5] + q3 * k3[p + 5]
              + q4 * k4[p + 5] + q5 * k5[p + 5] + q6 * k6[p + 5] + q7 * k7[p + 5])
        a6 = (q0 * k0[p + 6] + q1 * k1[p + 6] + q2 * k2[p + 6] + q3 * k3[p + 6]
              + q4 * k4[p + 6] + q5 * k5[p + 6] + q6 * k6[p + 6] + q7 * k7[p + 6])
        dst[p] += a0
        dst[_PITCH + p] += a1
        dst[2 * _PITCH + p] += a2
        dst[3 * _PITCH + p] += a3
        dst[4 * _PITCH + p] += a4
        dst[5 * _PITCH + p] += a5
        dst[6 * _PITCH + p] += a6


@kernel(parallel=False)
def _row_scores1(s, q, k, c, u, o, length):  # pragma: no cover - compiled
    """:func:`_row_scores8` for the one channel ``c``."""
    kc, qc, dst = k[c, o:], q[c * _PITCH:], s[_ROW * u * _PITCH:]
    for r in range(_ROW):
        row = dst[r * _PITCH:]
        for p in range(length):
            row[p] += qc[p] * kc[p + r]


@kernel(parallel=False)
def _row_values8(acc, w, v, c, u, o, length):  # pragma: no cover - compiled
    """``acc[i * _PITCH + p] += sum_r w[(7u + r) * _PITCH + p] * v[c + i, o + r + p]`` for
    ``i < 8``, ``r < 7``: window row ``u``."""
    v0, v1, v2, v3 = v[c, o:], v[c + 1, o:], v[c + 2, o:], v[c + 3, o:]
    v4, v5, v6, v7 = v[c + 4, o:], v[c + 5, o:], v[c + 6, o:], v[c + 7, o:]
    wu = w[_ROW * u * _PITCH:]
    for p in range(length):
        w0, w1, w2, w3 = wu[p], wu[_PITCH + p], wu[2 * _PITCH + p], wu[3 * _PITCH + p]
        w4, w5, w6 = wu[4 * _PITCH + p], wu[5 * _PITCH + p], wu[6 * _PITCH + p]
        acc[p] = (acc[p] + w0 * v0[p] + w1 * v0[p + 1] + w2 * v0[p + 2]
                  + w3 * v0[p + 3] + w4 * v0[p + 4] + w5 * v0[p + 5] + w6 * v0[p + 6])
        acc[1 * _PITCH + p] = (acc[1 * _PITCH + p] + w0 * v1[p] + w1 * v1[p + 1]
                               + w2 * v1[p + 2] + w3 * v1[p + 3] + w4 * v1[p + 4] + w5 * v1[p + 5]
                               + w6 * v1[p + 6])
        acc[2 * _PITCH + p] = (acc[2 * _PITCH + p] + w0 * v2[p] + w1 * v2[p + 1]
                               + w2 * v2[p + 2] + w3 * v2[p + 3] + w4 * v2[p + 4] + w5 * v2[p + 5]
                               + w6 * v2[p + 6])
        acc[3 * _PITCH + p] = (acc[3 * _PITCH + p] + w0 * v3[p] + w1 * v3[p + 1]
                               + w2 * v3[p + 2] + w3 * v3[p + 3] + w4 * v3[p + 4] + w5 * v3[p + 5]
                               + w6 * v3[p + 6])
        acc[4 * _PITCH + p] = (acc[4 * _PITCH + p] + w0 * v4[p] + w1 * v4[p + 1]
                               + w2 * v4[p + 2] + w3 * v4[p + 3] + w4 * v4[p + 4] + w5 * v4[p + 5]
                               + w6 * v4[p + 6])
        acc[5 * _PITCH + p] = (acc[5 * _PITCH + p] + w0 * v5[p] + w1 * v5[p + 1]
                               + w2 * v5[p + 2] + w3 * v5[p + 3] + w4 * v5[p + 4] + w5 * v5[p + 5]
                               + w6 * v5[p + 6])
        acc[6 * _PITCH + p] = (acc[6 * _PITCH + p] + w0 * v6[p] + w1 * v6[p + 1]
                               + w2 * v6[p + 2] + w3 * v6[p + 3] + w4 * v6[p + 4] + w5 * v6[p + 5]
                               + w6 * v6[p + 6])
        acc[7 * _PITCH + p] = (acc[7 * _PITCH + p] + w0 * v7[p] + w1 * v7[p + 1]
                               + w2 * v7[p + 2] + w3 * v7[p + 3] + w4 * v7[p + 4] + w5 * v7[p + 5]
                               + w6 * v7[p + 6])


@kernel(parallel=False)
def _row_values1(acc, w, v, c, u, o, length):  # pragma: no cover - compiled
    """:func:`_row_values8` for the one channel ``c`` (into ``acc[:length]``)."""
    vc, wu = v[c, o:], w[_ROW * u * _PITCH:]
    for r in range(_ROW):
        row = wu[r * _PITCH:]
        for p in range(length):
            acc[p] += row[p] * vc[p + r]


@kernel(parallel=False)
def _forward_rows7(qkv, pe, b, h, i0, chunk, block_rows, scale, rix, cix, consts, out, rate,
                   add):  # pragma: no cover - compiled
    """Output rows ``i0 .. i0 + chunk - 1`` of sample ``b``, head ``h`` with 7 x 7 windows at
    stride 1: the padded ``k - pe`` and ``v`` rows they read are copied once, then each block
    of ``block_rows`` rows: its queries, scores, exponentials and the weighted sums of the
    values, normalised as they are stored."""
    d, wo, wp = qkv.shape[1], out.shape[4], cix.shape[0]
    kb = np.empty((d, (chunk + _ROW - 1) * wp), dtype=qkv.dtype)
    vb = np.empty((d, (chunk + _ROW - 1) * wp), dtype=qkv.dtype)
    qb = np.empty(d * _PITCH, dtype=qkv.dtype)
    s = np.empty(_ROW * _ROW * _PITCH, dtype=qkv.dtype)
    acc = np.empty(8 * _PITCH, dtype=qkv.dtype)
    top = np.empty(_PITCH, dtype=qkv.dtype)
    total = np.empty(_PITCH, dtype=qkv.dtype)
    _load_keys(qkv, pe, b, h, i0, chunk + _ROW - 1, (_ROW - 1) // 2, rix, cix, kb, vb)
    full = d - d % 8
    for r0 in range(0, chunk, block_rows):
        rows = min(block_rows, chunk - r0)
        length = (rows - 1) * wp + wo
        _load_queries(qkv, b, h, i0 + r0, rows, 1, scale, wp, 0, qb.reshape((d, _PITCH)))
        s[:] = 0
        for u in range(_ROW):
            o = (r0 + u) * wp
            for c in range(0, full, 8):
                _row_scores8(s, qb, kb, c, u, o, length)
            for c in range(full, d):
                _row_scores1(s, qb, kb, c, u, o, length)
        _exponentials(s.reshape((_ROW * _ROW, _PITCH)), 0, length, consts, top, total)
        for c in range(0, full, 8):
            acc[:] = 0
            for u in range(_ROW):
                _row_values8(acc, s, vb, c, u, (r0 + u) * wp, length)
            for i in range(8):
                _store_rows(acc[i * _PITCH:], total, rows, wp, out, b, h, c + i, i0 + r0, rate,
                            add)
        for c in range(full, d):
            acc[:length] = 0
            for u in range(_ROW):
                _row_values1(acc, s, vb, c, u, (r0 + u) * wp, length)
            _store_rows(acc, total, rows, wp, out, b, h, c, i0 + r0, rate, add)


@kernel(parallel=False)
def _scatter_rows(dst, weights, values, margin, size, dilation, wp, length,
                  zero):  # pragma: no cover - compiled
    """The scatter of ``weights[t, p] * values[p]`` (``p < length``, at ``margin + p`` in both)
    to ``dst[p + tap(t)]``, written as gathers one window row ``u`` at a time, where the taps
    are shifts ``v * dilation`` within the row: ``dst[u * dilation * wp + x] += sum_v
    weights[u * size + v, margin + x - v * dilation] * values[margin + x - v * dilation]``.
    ``weights`` and ``values`` are zero for ``span = (size - 1) * dilation`` on both sides of
    their ``length``; ``zero`` is a zero row for the pairs past the last tap of a row."""
    span = (size - 1) * dilation
    dst[:] = 0
    for u in range(size):
        out = dst[u * dilation * wp:]
        for v in range(0, size, 8):
            o0, o1, o2, o3 = (margin - v * dilation, margin - (v + 1) * dilation,
                              margin - (v + 2) * dilation, margin - (v + 3) * dilation)
            o4, o5, o6, o7 = (margin - (v + 4) * dilation, margin - (v + 5) * dilation,
                              margin - (v + 6) * dilation, margin - (v + 7) * dilation)
            t = u * size + v
            _dot8(out, weights[t, o0:], weights[t + 1, o1:] if v + 1 < size else zero,
                  weights[t + 2, o2:] if v + 2 < size else zero,
                  weights[t + 3, o3:] if v + 3 < size else zero,
                  weights[t + 4, o4:] if v + 4 < size else zero,
                  weights[t + 5, o5:] if v + 5 < size else zero,
                  weights[t + 6, o6:] if v + 6 < size else zero,
                  weights[t + 7, o7:] if v + 7 < size else zero,
                  values[o0:], values[o1:] if v + 1 < size else zero,
                  values[o2:] if v + 2 < size else zero, values[o3:] if v + 3 < size else zero,
                  values[o4:] if v + 4 < size else zero, values[o5:] if v + 5 < size else zero,
                  values[o6:] if v + 6 < size else zero, values[o7:] if v + 7 < size else zero,
                  length + span)


@kernel(parallel=False)
def _gather_products(dst, a, b, offset, rows, width, wo, wp, stride):  # pragma: no cover
    """Any stride, row by row: ``dst[r * width + j] += a[r * width + j] *
    b[offset + r * stride * wp + j * stride]``."""
    for r in range(rows):
        o = r * width
        seg = b[offset + r * stride * wp:]
        for j in range(wo):
            dst[o + j] += a[o + j] * seg[j * stride]


@kernel(parallel=False)
def _scatter_products(dst, a, b, offset, rows, width, wo, wp, stride):  # pragma: no cover
    """The transpose of :func:`_gather_products`: ``dst[offset + window(p)] += a[p] * b[p]``."""
    for r in range(rows):
        o = r * width
        seg = dst[offset + r * stride * wp:]
        for j in range(wo):
            seg[j * stride] += a[o + j] * b[o + j]


@kernel(parallel=False)
def _load_queries(qkv, b, h, i0, rows, stride, scale, width, margin, qb):  # pragma: no cover
    """Copy output rows ``i0 .. i0 + rows - 1`` of the scaled ``q`` into ``qb`` (from
    ``margin``, row pitch ``width``, the rest zero)."""
    w = qkv.shape[5]
    wo = (w - 1) // stride + 1
    qb[:] = 0
    for c in range(qkv.shape[1]):
        for r in range(rows):
            src = qkv[b, c, 0, h, (i0 + r) * stride]
            dst = qb[c, margin + r * width:]
            if stride == 1:
                for j in range(wo):
                    dst[j] = src[j] * scale
            else:
                for j in range(wo):
                    dst[j] = src[j * stride] * scale


@kernel(parallel=False)
def _load_keys(qkv, pe, b, h, y0, used, pad, rix, cix, kb, vb):  # pragma: no cover - compiled
    """Copy the reflection-padded ``k - pe`` and ``v`` rows ``y0 .. y0 + used - 1`` (padded
    coordinates) into ``kb`` and ``vb`` (pitch ``len(cix)``)."""
    w = qkv.shape[5]
    wp = cix.shape[0]
    inner = min(w, wp - pad)  # padded columns pad .. pad + inner - 1 are columns 0 .. inner - 1
    for c in range(qkv.shape[1]):
        for r in range(used):
            row = rix[y0 + r]
            ksrc, vsrc, psrc = qkv[b, c, 1, h, row], qkv[b, c, 2, h, row], pe[c, row]
            kdst, vdst = kb[c, r * wp:], vb[c, r * wp:]
            kin, vin = kdst[pad:], vdst[pad:]
            for j in range(inner):
                kin[j] = ksrc[j] - psrc[j]
                vin[j] = vsrc[j]
            for j in range(pad):
                col = cix[j]
                kdst[j] = ksrc[col] - psrc[col]
                vdst[j] = vsrc[col]
            for j in range(pad + inner, wp):
                col = cix[j]
                kdst[j] = ksrc[col] - psrc[col]
                vdst[j] = vsrc[col]


@kernel(parallel=False)
def _load_block(qkv, pe, b, h, i0, rows, used, stride, pad, scale, rix, cix, width, margin,
                qb, kb, vb):  # pragma: no cover - compiled
    """A block's scaled ``q`` rows (:func:`_load_queries`) and its ``used`` padded ``k - pe``
    and ``v`` rows (:func:`_load_keys`)."""
    _load_queries(qkv, b, h, i0, rows, stride, scale, width, margin, qb)
    _load_keys(qkv, pe, b, h, i0 * stride, used, pad, rix, cix, kb, vb)


@kernel(parallel=False)
def _load_rows(src, b, h, i0, rows, width, margin, dst):  # pragma: no cover - compiled
    """``dst[c, margin + r * width + j] = src[b, h, c, i0 + r, j]``, the rest zero."""
    wo = src.shape[4]
    dst[:] = 0
    for c in range(src.shape[2]):
        for r in range(rows):
            row, out = src[b, h, c, i0 + r], dst[c, margin + r * width:]
            for j in range(wo):  # loops: a slice assignment would copy to guard overlap
                out[j] = row[j]


@kernel(parallel=False)
def _store_rows(src, norm, rows, width, dst, b, h, c, i0, rate, add):  # pragma: no cover
    """``dst[b, h, c, i0 + r, j] = src[r * width + j] * norm[r * width + j]``, or ``+= rate[0] *
    ...``."""
    factor = rate[0]
    for r in range(rows):
        row, seg, scale = dst[b, h, c, i0 + r], src[r * width:], norm[r * width:]
        if add:
            for j in range(row.shape[0]):
                row[j] += factor * (seg[j] * scale[j])
        else:
            for j in range(row.shape[0]):
                row[j] = seg[j] * scale[j]


@kernel()
def _forward_rows(qkv, pe, rix, cix, block_rows, chunk, scale, consts, out, rate,
                  add):  # pragma: no cover - compiled
    """The 7 x 7 path: jobs of ``chunk`` output rows (a multiple of ``block_rows``, or all
    rows), :func:`_forward_rows7`. A kernel of its own: compiled only where it runs."""
    n, heads, ho = qkv.shape[0], qkv.shape[3], out.shape[3]
    chunks = (ho + chunk - 1) // chunk
    for job in prange(n * heads * chunks):
        b, h, i0 = job // (heads * chunks), (job // chunks) % heads, (job % chunks) * chunk
        _forward_rows7(qkv, pe, b, h, i0, min(chunk, ho - i0), block_rows, scale, rix, cix,
                       consts, out, rate, add)


@kernel()
def _forward(qkv, pe, rix, cix, size, dilation, stride, scale, block_rows, consts, out, rate,
             add):  # pragma: no cover - compiled
    """The general sweeps: any window, stride and dilation."""
    n, d, _, heads, _, _ = qkv.shape
    ho, wo = out.shape[3], out.shape[4]
    wp = cix.shape[0]
    span = (size - 1) * dilation
    width = wp if stride == 1 else wo
    krows = (block_rows - 1) * stride + span + 1
    blocks = (ho + block_rows - 1) // block_rows
    for job in prange(n * heads * blocks):
        b, h, i0 = job // (heads * blocks), (job // blocks) % heads, (job % blocks) * block_rows
        rows = min(block_rows, ho - i0)
        length = (rows - 1) * width + wo
        used = (rows - 1) * stride + span + 1
        qb = np.empty((d, block_rows * width), dtype=qkv.dtype)
        kb = np.empty((d, krows * wp), dtype=qkv.dtype)
        vb = np.empty((d, krows * wp), dtype=qkv.dtype)
        s = np.empty((size * size, block_rows * width), dtype=qkv.dtype)
        acc = np.empty(block_rows * width, dtype=qkv.dtype)
        top = np.empty(block_rows * width, dtype=qkv.dtype)
        total = np.empty(block_rows * width, dtype=qkv.dtype)
        _load_block(qkv, pe, b, h, i0, rows, used, stride, span // 2, scale, rix, cix, width, 0,
                    qb, kb, vb)
        _attention_weights(qb, kb, 0, rows, width, wo, wp, size, dilation, stride, length,
                           consts, s, top, total, False)
        for c in range(d):
            if stride == 1:
                _window_sum(acc, s, vb[c], 0, size, dilation, wp, length)
            else:
                acc[:] = 0
                for t in range(size * size):
                    _gather_products(acc, s[t], vb[c], _tap(size, dilation, wp, t), rows,
                                     width, wo, wp, stride)
            _store_rows(acc, total, rows, width, out, b, h, c, i0, rate, add)


@kernel(parallel=False)
def _attention_weights(qb, kb, margin, rows, width, wo, wp, size, dilation, stride, length,
                       consts, s, top, total, normalise):  # pragma: no cover - compiled
    """``s[t, margin + p]``: the softmax weights of a block (``normalise``: zero outside ``p <
    length`` and in the junk columns), or their numerators, with ``total`` one over their sums
    (:func:`_exponentials`)."""
    s[:] = 0
    if stride == 1:
        _correlate(s, qb, kb, margin, size, dilation, wp, length)
    else:
        for c in range(qb.shape[0]):
            for t in range(size * size):
                _gather_products(s[t, margin:], qb[c, margin:], kb[c],
                                 _tap(size, dilation, wp, t), rows, width, wo, wp, stride)
    if not normalise:
        _exponentials(s, margin, length, consts, top, total)
        return
    _softmax(s, margin, length, consts, top, total)
    for t in range(size * size):
        for r in range(rows):  # junk columns: no contribution, even from NaN
            s[t, margin + r * width + wo:margin + (r + 1) * width] = 0


@kernel()
def _backward(grad, qkv, pe, rix, cix, size, dilation, stride, scale, block_rows, consts,
              grad_qkv):  # pragma: no cover - compiled
    """``grad_qkv`` must come in zeroed."""
    n, d, _, heads, _, _ = qkv.shape
    ho, wo = grad.shape[3], grad.shape[4]
    wp = cix.shape[0]
    taps = size * size
    span = (size - 1) * dilation
    width = wp if stride == 1 else wo
    krows = (block_rows - 1) * stride + span + 1
    margin = span if stride == 1 else 0  # zeros before and after each row's data
    buffer = margin + krows * wp
    pad = span // 2
    inner = min(qkv.shape[5], wp - pad)  # padded columns that are columns 0 .. inner - 1
    blocks = (ho + block_rows - 1) // block_rows
    for parity in range(2):
        count = (blocks + 1 - parity) // 2
        for job in prange(n * heads * count):
            b, h = job // (heads * count), (job // count) % heads
            i0 = (2 * (job % count) + parity) * block_rows
            rows = min(block_rows, ho - i0)
            length = (rows - 1) * width + wo
            used = (rows - 1) * stride + span + 1
            qb = np.empty((d, buffer), dtype=qkv.dtype)
            gb = np.empty((d, buffer), dtype=qkv.dtype)
            ab = np.empty((taps, buffer), dtype=qkv.dtype)
            kb = np.empty((d, krows * wp), dtype=qkv.dtype)
            vb = np.empty((d, krows * wp), dtype=qkv.dtype)
            gs = np.zeros((taps, buffer), dtype=qkv.dtype)
            gk = np.empty(krows * wp, dtype=qkv.dtype)
            gv = np.empty(krows * wp, dtype=qkv.dtype)
            acc = np.empty(buffer, dtype=qkv.dtype)
            top = np.empty(buffer, dtype=qkv.dtype)
            zero = np.zeros(buffer, dtype=qkv.dtype)
            _load_block(qkv, pe, b, h, i0, rows, used, stride, pad, scale, rix, cix, width,
                        margin, qb, kb, vb)
            _load_rows(grad, b, h, i0, rows, width, margin, gb)
            _attention_weights(qb, kb, margin, rows, width, wo, wp, size, dilation, stride,
                               length, consts, ab, top, acc, True)  # recomputed, not stored
            # score gradients: gs = att * (grad . values - sum_t att * grad . values)
            if stride == 1:
                _correlate(gs, gb, vb, margin, size, dilation, wp, length)
            else:
                for c in range(d):
                    for t in range(taps):
                        _gather_products(gs[t], gb[c], vb[c], _tap(size, dilation, wp, t),
                                         rows, width, wo, wp, stride)
            acc[:] = 0
            for t in range(taps):
                for p in range(margin, margin + length):
                    acc[p] += ab[t, p] * gs[t, p]
            for t in range(taps):
                for p in range(margin, margin + length):
                    gs[t, p] = ab[t, p] * (gs[t, p] - acc[p])
                for r in range(rows):  # junk columns: no contribution, even from NaN
                    gs[t, margin + r * width + wo:margin + (r + 1) * width] = 0
            for c in range(d):
                if stride == 1:
                    _window_sum(acc, gs, kb[c], margin, size, dilation, wp, length)
                    _scatter_rows(gk[:used * wp], gs, qb[c], margin, size, dilation, wp, length,
                                  zero)
                    _scatter_rows(gv[:used * wp], ab, gb[c], margin, size, dilation, wp, length,
                                  zero)
                else:
                    acc[:] = 0
                    gk[:] = 0
                    gv[:] = 0
                    for t in range(taps):
                        offset = _tap(size, dilation, wp, t)
                        _gather_products(acc, gs[t], kb[c], offset, rows, width, wo, wp, stride)
                        _scatter_products(gk, gs[t], qb[c], offset, rows, width, wo, wp, stride)
                        _scatter_products(gv, ab[t], gb[c], offset, rows, width, wo, wp, stride)
                for r in range(rows):
                    dst, src = grad_qkv[b, c, 0, h, (i0 + r) * stride], acc[r * width:]
                    for j in range(wo):
                        dst[j * stride] = src[j] * scale
                for r in range(used):  # only the block's own rows: no race with other jobs
                    row = rix[i0 * stride + r]
                    kdst, vdst = grad_qkv[b, c, 1, h, row], grad_qkv[b, c, 2, h, row]
                    ksrc, vsrc = gk[r * wp:], gv[r * wp:]
                    kin, vin = ksrc[pad:], vsrc[pad:]
                    for j in range(inner):
                        kdst[j] += kin[j]
                        vdst[j] += vin[j]
                    for j in range(pad):
                        kdst[cix[j]] += ksrc[j]
                        vdst[cix[j]] += vsrc[j]
                    for j in range(pad + inner, wp):
                        kdst[cix[j]] += ksrc[j]
                        vdst[cix[j]] += vsrc[j]


def reflect_indices(
    size: int | torch.SymInt, pad: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Source index of each padded position ``-pad .. size + pad - 1`` under reflection.

    Reflection about the first and last element (the edge is not repeated), iterated while the
    position is still outside: with period ``2 * (size - 1)``, ``i -> last - |(i mod period) -
    last|``. For ``pad < size`` this is exactly ``nn.ReflectionPad2d``; it stays defined for
    ``pad >= size`` (where PyTorch's reflection padding raises), and a size-1 axis replicates its
    single element.

    A concrete ``size`` gives a constant index tensor (cheap for ``torch.compile``); a symbolic
    one (``torch.export`` with dynamic dims) the same formula in tensor arithmetic, so the export
    stays dynamic.
    """
    if isinstance(size, int):
        last, period = size - 1, max(2 * size - 2, 1)
        index = [last - abs(i % period - last) for i in range(-pad, size + pad)]
        return torch.tensor(index, device=device)
    positions = torch.arange(-pad, size + pad, device=device)
    last = torch.full((), size - 1, device=device, dtype=positions.dtype)
    period = (2 * last).clamp_min(1)
    # positions mod period, spelled out: inductor mis-ranges torch.remainder by a tensor here
    phase = positions - period * torch.div(positions, period, rounding_mode="floor")
    return last - (phase - last).abs()


def _geometry(qkv: torch.Tensor, size: int, dilation: int, stride: int, backward: bool):
    """Output size, block rows and the reflection tables of rows and columns."""
    h, w = qkv.shape[-2:]
    ho, wo = -(-h // stride), -(-w // stride)
    span = (size - 1) * dilation
    width = w + span if stride == 1 else wo
    length = _BACKWARD_LENGTH if backward else _FORWARD_LENGTH
    block_rows = max(1, min(ho, length // max(width, 1)))
    if backward:  # same-parity blocks must not share rows
        block_rows = max(block_rows, min(ho, -(-span // stride)))
        if span // 2 >= h:  # iterated reflection can reach any row: one block
            block_rows = ho
    return ho, wo, block_rows, reflect_indices(h, span // 2), reflect_indices(w, span // 2)


def _scalar(value: float, like: torch.Tensor) -> np.floating:
    """``value`` in ``like``'s dtype, so that the kernels multiply in that dtype."""
    return (np.float32 if like.dtype == torch.float32 else np.float64)(value)


def _check(qkv: torch.Tensor, pe: torch.Tensor) -> None:
    torch._check(qkv.dim() == 6 and qkv.shape[2] == 3, lambda: "qkv: (B, D, 3, heads, H, W)")
    torch._check(pe.shape == (qkv.shape[1], *qkv.shape[-2:]), lambda: "pe: (D, H, W)")


@torch.library.custom_op("blockzoo::window_attention", mutates_args=())
def window_attention(
    qkv: torch.Tensor, pe: torch.Tensor, size: int, dilation: int, stride: int, scale: float,
) -> torch.Tensor:
    """Output ``(B, heads, D, Ho, Wo)``.

    ``qkv``: ``(B, D, 3, heads, H, W)`` (``q``, ``k``, ``v`` on dim 2, unpadded, full
    resolution); ``pe``: ``(D, H, W)``; ``scale`` multiplies ``q``. ``Ho = ceil(H / stride)``.
    CPU, float32/float64, equal dtypes. The attention weights are not stored: the backward pass
    recomputes them block by block (cheaper than writing and reading ``(B, heads, size^2, Ho,
    Wo)``, and that much less memory held between the passes).
    """
    _check(qkv, pe)
    n, d, _, heads, h, w = qkv.shape
    out = qkv.new_empty(n, heads, d, (h + stride - 1) // stride, (w + stride - 1) // stride)
    _run_forward(qkv, pe, size, dilation, stride, scale, out, None)
    return out


def _run_forward(qkv: torch.Tensor, pe: torch.Tensor, size: int, dilation: int, stride: int,
                 scale: float, out: torch.Tensor, rate: torch.Tensor | None,
                 rows_of_seven: bool = True) -> None:
    """Write the attention into ``out`` (``rate is None``) or add ``rate * attention`` to it.

    7 x 7 windows at stride 1 and dilation 1 on maps up to ``_PITCH - 6`` wide take the
    7 x 7 path unless ``rows_of_seven`` is false (for comparisons); the rest the general sweeps.
    """
    qkv, pe = qkv.contiguous(), pe.contiguous()
    _, _, block_rows, rows, cols = _geometry(qkv, size, dilation, stride, False)
    if out.numel():
        factor = qkv.new_ones(1) if rate is None else rate.detach().reshape(1)
        chunk = 0
        if rows_of_seven and (size, dilation, stride) == (_ROW, 1, 1) and len(cols) <= _PITCH:
            # up to _CHUNK_BLOCKS blocks per job (each job copies the padded key rows its blocks
            # read once), while there are _JOBS_PER_THREAD jobs for each thread
            blocks = -(-out.shape[3] // block_rows)
            per_job = (out.shape[0] * out.shape[1] * blocks) // (_JOBS_PER_THREAD
                                                                  * torch.get_num_threads())
            chunk = min(block_rows * max(1, min(_CHUNK_BLOCKS, per_job)), out.shape[3])
        arrays = (as_array(qkv), as_array(pe), rows.numpy(), cols.numpy())
        with kernel_threads(chunk=1):  # jobs handed out one at a time: a busy core holds up none
            if chunk:
                _forward_rows(*arrays, block_rows, chunk, _scalar(scale, qkv),
                              _exp_constants(qkv.dtype), as_array(out), as_array(factor),
                              rate is not None)
            else:
                _forward(*arrays, size, dilation, stride, _scalar(scale, qkv), block_rows,
                         _exp_constants(qkv.dtype), as_array(out), as_array(factor),
                         rate is not None)


@window_attention.register_fake
def _(qkv, pe, size, dilation, stride, scale):
    _check(qkv, pe)
    n, d, _, heads, h, w = qkv.shape
    return qkv.new_empty(n, heads, d, (h + stride - 1) // stride, (w + stride - 1) // stride)


@torch.library.custom_op("blockzoo::window_attention_add_", mutates_args=("out",))
def window_attention_add_(
    out: torch.Tensor, rate: torch.Tensor, qkv: torch.Tensor, pe: torch.Tensor, size: int,
    dilation: int, stride: int, scale: float,
) -> None:
    """``out += rate * window_attention(qkv, pe, ...)`` in place, for inference (no autograd):
    ``out`` contiguous ``(B, heads * D, Ho, Wo)``, ``rate`` one element. Spares the block a
    separate output and a pass over it."""
    _check(qkv, pe)
    torch._check(out.is_contiguous() and rate.numel() == 1, lambda: "out, rate")
    n, d, _, heads = qkv.shape[:4]
    _run_forward(qkv, pe, size, dilation, stride, scale,
                 out.view(n, heads, d, *out.shape[-2:]), rate)


@window_attention_add_.register_fake
def _(out, rate, qkv, pe, size, dilation, stride, scale):
    _check(qkv, pe)


@torch.library.custom_op("blockzoo::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad: torch.Tensor, qkv: torch.Tensor, pe: torch.Tensor, size: int, dilation: int,
    stride: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`window_attention`'s output to ``qkv`` and ``pe``."""
    grad, qkv, pe = grad.contiguous(), qkv.contiguous(), pe.contiguous()
    grad_qkv = torch.zeros_like(qkv)
    if grad.numel():
        _, _, block_rows, rows, cols = _geometry(qkv, size, dilation, stride, True)
        with kernel_threads(chunk=1):  # jobs handed out one at a time: a busy core holds up none
            _backward(as_array(grad), as_array(qkv), as_array(pe), rows.numpy(), cols.numpy(),
                      size, dilation, stride, _scalar(scale, qkv), block_rows,
                      _exp_constants(qkv.dtype), as_array(grad_qkv))
    return grad_qkv, -grad_qkv[:, :, 1].sum((0, 2))


@window_attention_backward.register_fake
def _(grad, qkv, pe, size, dilation, stride, scale):
    return torch.empty_like(qkv), torch.empty_like(pe)


def _setup_context(ctx, inputs, output) -> None:
    qkv, pe, size, dilation, stride, scale = inputs
    ctx.save_for_backward(qkv, pe)
    ctx.geometry = (size, dilation, stride, scale)


def _backward_formula(ctx, grad_out):
    qkv, pe = ctx.saved_tensors
    grads = window_attention_backward(grad_out, qkv, pe, *ctx.geometry)
    return (*grads, None, None, None, None)


window_attention.register_autograd(_backward_formula, setup_context=_setup_context)

