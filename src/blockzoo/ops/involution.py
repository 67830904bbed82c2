"""Involution's aggregation as one compiled CPU operator (forward and backward).

Involution: Inverting the Inherence of Convolution for Visual Recognition, Li et al., CVPR 2021,
arXiv 2103.06255

``out[n, c, i, j] = sum_{u, v} kernel[n, g(c), u, v, i, j] * xp[n, c, i * s + u, j * s + v]`` on
the zero-padded input ``xp`` (see :func:`blockzoo.blocks.involution.involution2d`). The kernels
loop over rows: each parallel job owns one output row of one channel group, keeps the ``K * K``
kernel rows of that position in cache for the group's channels, and adds ``K * K`` shifted input
rows into the output row (a contiguous, vectorised inner loop for stride 1). The backward pass
gathers into rows of the padded input gradient (each row written by one job, so the result is
deterministic) and reduces the kernel gradient over the group's channels in a fixed order.
"""

from __future__ import annotations

import torch

from ._backend import as_array, kernel, kernel_threads, prange


@kernel()
def _forward(xp, weight, stride, out):  # pragma: no cover - compiled
    n, c = xp.shape[0], xp.shape[1]
    groups, k, ho, wo = weight.shape[1], weight.shape[2], weight.shape[4], weight.shape[5]
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
                    if stride == 1:
                        for j in range(wo):
                            row[j] += wrow[j] * xrow[j + v]
                    else:
                        for j in range(wo):
                            row[j] += wrow[j] * xrow[j * stride + v]


@kernel()
def _backward_input(grad, weight, stride, grad_xp):  # pragma: no cover - compiled
    n, c, hp = grad_xp.shape[0], grad_xp.shape[1], grad_xp.shape[2]
    groups, k, ho, wo = weight.shape[1], weight.shape[2], weight.shape[4], weight.shape[5]
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
                    if stride == 1:
                        for j in range(wo):
                            row[j + v] += wrow[j] * grow[j]
                    else:
                        for j in range(wo):
                            row[j * stride + v] += wrow[j] * grow[j]


@kernel()
def _backward_kernel(grad, xp, stride, grad_weight):  # pragma: no cover - compiled
    n, c = xp.shape[0], xp.shape[1]
    groups, k = grad_weight.shape[1], grad_weight.shape[2]
    ho, wo = grad_weight.shape[4], grad_weight.shape[5]
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
                    if stride == 1:
                        for j in range(wo):
                            gwrow[j] += grow[j] * xrow[j + v]
                    else:
                        for j in range(wo):
                            gwrow[j] += grow[j] * xrow[j * stride + v]


def _output_shape(xp: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
    return xp.shape[0], xp.shape[1], weight.shape[4], weight.shape[5]


@torch.library.custom_op("blockzoo::involution_aggregate", mutates_args=())
def involution_aggregate(xp: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """``(N, C, s * Ho + K - 1, s * Wo + K - 1)`` padded input, ``(N, G, K, K, Ho, Wo)`` kernel
    -> ``(N, C, Ho, Wo)`` (CPU, float32/float64, equal dtypes)."""
    xp, weight = xp.contiguous(), weight.contiguous()
    out = xp.new_empty(_output_shape(xp, weight))
    if out.numel():
        with kernel_threads():
            _forward(as_array(xp), as_array(weight), stride, as_array(out))
    return out


@involution_aggregate.register_fake
def _(xp: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    return xp.new_empty(_output_shape(xp, weight))


@torch.library.custom_op("blockzoo::involution_aggregate_backward", mutates_args=())
def involution_aggregate_backward(
    grad: torch.Tensor, xp: torch.Tensor, weight: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`involution_aggregate` to the padded input and to the kernel."""
    grad, xp, weight = grad.contiguous(), xp.contiguous(), weight.contiguous()
    grad_xp, grad_weight = torch.empty_like(xp), torch.empty_like(weight)
    if grad_xp.numel() and grad_weight.numel():
        with kernel_threads():
            _backward_input(as_array(grad), as_array(weight), stride, as_array(grad_xp))
            _backward_kernel(as_array(grad), as_array(xp), stride, as_array(grad_weight))
    else:
        grad_xp.zero_()
        grad_weight.zero_()
    return grad_xp, grad_weight


@involution_aggregate_backward.register_fake
def _(grad, xp, weight, stride):
    return torch.empty_like(xp), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    xp, weight, stride = inputs
    ctx.save_for_backward(xp, weight)
    ctx.stride = stride


def _backward(ctx, grad):
    xp, weight = ctx.saved_tensors
    grad_xp, grad_weight = involution_aggregate_backward(grad, xp, weight, ctx.stride)
    return grad_xp, grad_weight, None


involution_aggregate.register_autograd(_backward, setup_context=_setup_context)
