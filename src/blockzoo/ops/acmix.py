"""ACmix's local window attention as one compiled CPU operator (forward and backward).

On the Integration of Self-Attention and Convolution, Pan et al., CVPR 2022, arXiv 2111.14556

For each output position ``(i, j)`` and window tap ``t = (u, r)`` (row-major, ``T = K * K``)::

    score[b, t, i, j] = sum_d q[b, d, i, j] * keys[b, d, i * s + u * dil, j * s + r * dil]
    att = softmax over t of score
    out[b, d, i, j] = sum_t att[b, t, i, j] * values[b, d, i * s + u * dil, j * s + r * dil]

on padded ``keys`` and ``values`` (the caller pads them; see
:func:`blockzoo.blocks.acmix.local_window_attention`). The forward pass makes one sweep per output
row: the ``T`` score rows, their softmax and the weighted sum stay in cache. The backward pass
first gives, per output row, the score gradients and the gradient to ``q``, then, per channel
plane, scatters into the ``keys`` and ``values`` gradients; every array element is written by one
job, so the result is deterministic. The ``(B, T, Ho, Wo)`` attention weights are kept for the
backward pass; nothing of size ``B * D * T * Ho * Wo`` is.
"""

from __future__ import annotations

import numpy as np
import torch

from ._backend import as_array, kernel, kernel_threads, prange


@kernel()
def _forward(q, keys, values, size, dilation, stride, out, att):  # pragma: no cover - compiled
    n, d, ho, wo = q.shape
    taps = size * size
    for job in prange(n * ho):
        b, i = job // ho, job % ho
        scores = np.zeros((taps, wo), dtype=q.dtype)  # contiguous rows: vectorised loops
        for t in range(taps):
            row = i * stride + (t // size) * dilation
            col = (t % size) * dilation
            srow = scores[t]
            for c in range(d):
                qrow = q[b, c, i]
                krow = keys[b, c, row]
                if stride == 1:
                    for j in range(wo):
                        srow[j] += qrow[j] * krow[j + col]
                else:
                    for j in range(wo):
                        srow[j] += qrow[j] * krow[j * stride + col]
        top = scores[0].copy()
        for t in range(1, taps):
            for j in range(wo):
                top[j] = max(top[j], scores[t, j])
        total = np.zeros(wo, dtype=q.dtype)
        for t in range(taps):
            for j in range(wo):
                scores[t, j] = np.exp(scores[t, j] - top[j])
                total[j] += scores[t, j]
        for t in range(taps):
            for j in range(wo):
                scores[t, j] /= total[j]
        for c in range(d):
            orow = out[b, c, i]
            orow[:] = 0
            for t in range(taps):
                arow = scores[t]
                vrow = values[b, c, i * stride + (t // size) * dilation]
                col = (t % size) * dilation
                if stride == 1:
                    for j in range(wo):
                        orow[j] += arow[j] * vrow[j + col]
                else:
                    for j in range(wo):
                        orow[j] += arow[j] * vrow[j * stride + col]
        for t in range(taps):
            att[b, t, i, :] = scores[t]


@kernel()
def _backward_rows(grad, q, keys, values, att, size, dilation, stride,
                   grad_scores, grad_q):  # pragma: no cover - compiled
    n, d, ho, wo = q.shape
    taps = size * size
    for job in prange(n * ho):
        b, i = job // ho, job % ho
        gs = np.zeros((taps, wo), dtype=q.dtype)
        a = np.empty((taps, wo), dtype=q.dtype)
        for t in range(taps):
            a[t] = att[b, t, i, :]
        for t in range(taps):
            vrow_index = i * stride + (t // size) * dilation
            col = (t % size) * dilation
            grow = gs[t]
            for c in range(d):
                gorow = grad[b, c, i]
                vrow = values[b, c, vrow_index]
                if stride == 1:
                    for j in range(wo):
                        grow[j] += gorow[j] * vrow[j + col]
                else:
                    for j in range(wo):
                        grow[j] += gorow[j] * vrow[j * stride + col]
        dot = np.zeros(wo, dtype=q.dtype)
        for t in range(taps):
            for j in range(wo):
                dot[j] += a[t, j] * gs[t, j]
        for t in range(taps):
            for j in range(wo):
                gs[t, j] = a[t, j] * (gs[t, j] - dot[j])
            grad_scores[b, t, i, :] = gs[t]
        for c in range(d):
            gq = grad_q[b, c, i]
            gq[:] = 0
            for t in range(taps):
                krow = keys[b, c, i * stride + (t // size) * dilation]
                col = (t % size) * dilation
                srow = gs[t]
                if stride == 1:
                    for j in range(wo):
                        gq[j] += srow[j] * krow[j + col]
                else:
                    for j in range(wo):
                        gq[j] += srow[j] * krow[j * stride + col]


@kernel()
def _backward_planes(grad, q, att, grad_scores, size, dilation, stride,
                     grad_keys, grad_values):  # pragma: no cover - compiled
    n, d, ho, wo = q.shape
    taps = size * size
    for job in prange(n * d):
        b, c = job // d, job % d
        grad_keys[b, c] = 0
        grad_values[b, c] = 0
        for i in range(ho):
            qrow = q[b, c, i]
            gorow = grad[b, c, i]
            for t in range(taps):
                row = i * stride + (t // size) * dilation
                col = (t % size) * dilation
                gk, gv = grad_keys[b, c, row], grad_values[b, c, row]
                srow, arow = grad_scores[b, t, i], att[b, t, i]
                if stride == 1:
                    for j in range(wo):
                        gk[j + col] += srow[j] * qrow[j]
                        gv[j + col] += arow[j] * gorow[j]
                else:
                    for j in range(wo):
                        gk[j * stride + col] += srow[j] * qrow[j]
                        gv[j * stride + col] += arow[j] * gorow[j]


def _shapes(q: torch.Tensor, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n, d, ho, wo = q.shape
    return (n, d, ho, wo), (n, size * size, ho, wo)


@torch.library.custom_op("blockzoo::window_attention", mutates_args=())
def window_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, size: int, dilation: int,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(B, D, Ho, Wo)`` and attention weights ``(B, size^2, Ho, Wo)``.

    ``q``: ``(B, D, Ho, Wo)`` (already subsampled and scaled); ``keys``, ``values``: padded
    ``(B, D, Hp, Wp)`` with ``Hp >= (Ho - 1) * stride + (size - 1) * dilation + 1`` (same for
    ``Wp``). CPU, float32/float64, equal dtypes.
    """
    q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
    out_shape, att_shape = _shapes(q, size)
    out, att = q.new_empty(out_shape), q.new_empty(att_shape)
    if out.numel() or att.numel():
        with kernel_threads():
            _forward(as_array(q), as_array(keys), as_array(values), size, dilation, stride,
                     as_array(out), as_array(att))
    return out, att


@window_attention.register_fake
def _(q, keys, values, size, dilation, stride):
    out_shape, att_shape = _shapes(q, size)
    return q.new_empty(out_shape), q.new_empty(att_shape)


@torch.library.custom_op("blockzoo::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    att: torch.Tensor, size: int, dilation: int, stride: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`window_attention`'s output to ``q``, ``keys`` and ``values``."""
    grad, q, keys, values, att = (t.contiguous() for t in (grad, q, keys, values, att))
    grad_q, grad_keys, grad_values = (torch.empty_like(t) for t in (q, keys, values))
    if grad.numel():
        grad_scores = torch.empty_like(att)
        arrays = [as_array(t) for t in (grad, q, keys, values, att)]
        with kernel_threads():
            _backward_rows(*arrays, size, dilation, stride, as_array(grad_scores),
                           as_array(grad_q))
            _backward_planes(arrays[0], arrays[1], arrays[4], as_array(grad_scores), size,
                             dilation, stride, as_array(grad_keys), as_array(grad_values))
    else:
        for t in (grad_q, grad_keys, grad_values):
            t.zero_()
    return grad_q, grad_keys, grad_values


@window_attention_backward.register_fake
def _(grad, q, keys, values, att, size, dilation, stride):
    return torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values)


def _setup_context(ctx, inputs, output) -> None:
    q, keys, values, size, dilation, stride = inputs
    ctx.save_for_backward(q, keys, values, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.geometry = (size, dilation, stride)


def _backward(ctx, grad_out, grad_att):
    q, keys, values, att = ctx.saved_tensors
    grads = window_attention_backward(grad_out, q, keys, values, att, *ctx.geometry)
    return (*grads, None, None, None)


window_attention.register_autograd(_backward, setup_context=_setup_context)

