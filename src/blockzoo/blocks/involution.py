"""Involution: a spatially specific, channel-shared kernel generated from the input.

Involution: Inverting the Inherence of Convolution for Visual Recognition, Li et al., CVPR 2021,
arXiv 2103.06255

The reference code applies the generated kernels with ``nn.Unfold``, which materialises
``N * C * K * K * Ho * Wo`` values (49 times the output for ``K = 7``) and twice that again in
the backward pass. :func:`involution2d` computes the same sum by accumulating over the ``K * K``
offsets of a zero-padded input (one strided slice per offset), with a hand-written backward that
accumulates in the same way: nothing of size ``N * C * K * K * Ho * Wo`` is ever allocated, the
largest tensors being a padded copy of the input, the kernel and their gradients.
:func:`involution_unfold_reference` keeps the unfold form for tests and benchmarks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.counting import map_elements
from ..core.validation import check_positive_int
from ..layers import ConvNormAct, LayerSpec
from ..ops import involution_aggregate, use_fast_path
from ..registry import register_block
from .base import Block, ExplainKey, runs_as_matmul


def _check_operands(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> tuple[int, int]:
    """Validate ``x`` ``(N, C, H, W)`` against ``kernel`` ``(N, G, K, K, Ho, Wo)``.

    The spatial sizes are compared only when they are plain integers (eager mode), so that
    symbolic sizes during export are not specialised.
    """
    if x.dim() != 4 or kernel.dim() != 6:
        raise ValueError(
            f"involution2d expects x of shape (N, C, H, W) and kernel of shape "
            f"(N, G, K, K, Ho, Wo), got {tuple(x.shape)} and {tuple(kernel.shape)}"
        )
    groups, k = kernel.shape[1], kernel.shape[2]
    if kernel.shape[3] != k or k % 2 == 0:
        raise ValueError(f"involution2d needs a square odd kernel, got {tuple(kernel.shape)}")
    if x.shape[1] % groups != 0:
        raise ValueError(
            f"involution2d: the {x.shape[1]} channels of x are not divisible by the "
            f"{groups} kernel groups"
        )
    check_positive_int("involution2d", "stride", stride)
    sizes = (*x.shape[2:], *kernel.shape[4:])
    if all(isinstance(size, int) for size in sizes):
        expected = (-(-sizes[0] // stride), -(-sizes[1] // stride))
        if tuple(sizes[2:]) != expected:
            raise ValueError(
                f"involution2d: kernel positions {tuple(sizes[2:])} do not match the output "
                f"size {expected} = ceil(({sizes[0]}, {sizes[1]}) / {stride})"
            )
    return groups, k


def _window(xp: torch.Tensor, u: int, v: int, k: int, stride: int) -> torch.Tensor:
    """``xp[..., u + stride * i, v + stride * j]`` for all output positions ``(i, j)``.

    A strided view. ``xp`` comes from :func:`_grouped_padded`, of size ``stride * Ho + k - 1``;
    the slice bounds are constants (the end counted from the back), so that export needs no
    shape arithmetic beyond ``Ho = (H + (-H) % stride) // stride``.
    """
    end_u, end_v = u - (k - 1) - (stride - 1) or None, v - (k - 1) - (stride - 1) or None
    return xp[..., u:end_u:stride, v:end_v:stride]


def _grouped_padded(x: torch.Tensor, groups: int, k: int, stride: int) -> torch.Tensor:
    """``(N, C, H, W) -> (N, G, C / G, stride * Ho + k - 1, stride * Wo + k - 1)``, zero padded.

    ``(k - 1) / 2`` zeros on the top/left, as many plus ``(-H) % stride`` on the bottom/right.
    """
    n, c, h, w = x.shape
    p = (k - 1) // 2
    xp = F.pad(x, (p, p + (-w) % stride, p, p + (-h) % stride))
    return xp.reshape(n, groups, c // groups, xp.shape[2], xp.shape[3])


def ceil_avg_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average over ``stride x stride`` blocks, ``(N, C, ceil(H / s), ceil(W / s))``.

    The blocks that overhang the bottom/right edge average their valid pixels only, exactly as
    ``F.avg_pool2d(x, stride, stride, ceil_mode=True)``; written as a zero-padded pool divided
    by the pooled valid-pixel mask, whose sizes export to ONNX without shape guards.
    """
    h, w = x.shape[-2:]
    pad = (0, (-w) % stride, 0, (-h) % stride)
    valid = F.avg_pool2d(F.pad(x.new_ones(1, 1, h, w), pad), stride, stride)
    return F.avg_pool2d(F.pad(x, pad), stride, stride) / valid


def _offset_weights(kernel: torch.Tensor) -> list[torch.Tensor]:
    """``kernel (N, G, K, K, Ho, Wo)`` as ``K * K`` views ``(N, G, 1, Ho, Wo)``, row-major."""
    return list(kernel.flatten(2, 3).unsqueeze(2).unbind(3))


def _accumulate(xp: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """Out-of-place offset accumulation (the graph that is compiled and exported)."""
    k = kernel.shape[2]
    out = None
    for index, weight in enumerate(_offset_weights(kernel)):
        term = _window(xp, index // k, index % k, k, stride) * weight
        out = term if out is None else out + term
    return out


class _Involution(torch.autograd.Function):
    """Offset accumulation with a backward that accumulates too (nothing ``K * K`` times bigger).

    Forward: ``out += window(u, v) * kernel[u, v]`` for each offset, in place. Backward:
    ``grad_xp[window(u, v)] += grad_out * kernel[u, v]`` and
    ``grad_kernel[u, v] = sum_c grad_out * window(u, v)``.
    """

    @staticmethod
    def forward(ctx, xp: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
        k = kernel.shape[2]
        out = xp.new_zeros(xp.shape[:3] + kernel.shape[4:])
        for index, weight in enumerate(_offset_weights(kernel)):
            out.addcmul_(_window(xp, index // k, index % k, k, stride), weight)
        ctx.save_for_backward(xp, kernel)
        ctx.stride = stride
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        xp, kernel = ctx.saved_tensors
        stride, k = ctx.stride, kernel.shape[2]
        grad_xp = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_xp = torch.zeros_like(xp, memory_format=torch.contiguous_format)
            for index, weight in enumerate(_offset_weights(kernel)):
                _window(grad_xp, index // k, index % k, k, stride).addcmul_(grad_out, weight)
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.empty_like(kernel, memory_format=torch.contiguous_format)
            for index, grad_weight in enumerate(_offset_weights(grad_kernel)):
                window = _window(xp, index // k, index % k, k, stride)
                grad_weight.copy_((grad_out * window).sum(dim=2, keepdim=True))
        return grad_xp, grad_kernel, None


def involution2d(x: torch.Tensor, kernel: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Apply per-position involution kernels to ``x``, memory-efficiently.

    ``x``: ``(N, C, H, W)``; ``kernel``: ``(N, G, K, K, Ho, Wo)`` with ``G`` dividing ``C``, ``K``
    odd and ``Ho = ceil(H / stride)``, ``Wo = ceil(W / stride)``. Channel ``c`` belongs to group
    ``c // (C / G)``. With zero padding ``p = (K - 1) / 2``::

        out[n, g*C/G + c, i, j] = sum_{u, v} kernel[n, g, u, v, i, j]
                                             * x[n, g*C/G + c, i*stride + u - p, j*stride + v - p]

    Equal to :func:`involution_unfold_reference`, but the peak extra memory is about one padded
    copy of ``x`` instead of ``K * K`` copies, in the forward and in the backward pass.
    """
    groups, k = _check_operands(x, kernel, stride)
    dtype = torch.promote_types(x.dtype, kernel.dtype)
    x, kernel = x.to(dtype), kernel.to(dtype)
    n, c, h, w = x.shape
    if use_fast_path(x, kernel):
        return involution_aggregate(x, kernel, stride)
    xp = _grouped_padded(x, groups, k, stride)
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        out = _Involution.apply(xp, kernel, stride)
    else:
        out = _accumulate(xp, kernel, stride)
    return out.reshape(n, c, kernel.shape[4], kernel.shape[5])


def involution_unfold_reference(
    x: torch.Tensor, kernel: torch.Tensor, stride: int = 1
) -> torch.Tensor:
    """The reference code's unfold formulation of :func:`involution2d` (same arguments).

    Materialises the ``(N, G, C/G, K*K, Ho, Wo)`` windows of ``x``; kept for tests and
    benchmarks only.
    """
    groups, k = _check_operands(x, kernel, stride)
    n, c = x.shape[:2]
    ho, wo = kernel.shape[4], kernel.shape[5]
    windows = F.unfold(x, k, padding=(k - 1) // 2, stride=stride)
    windows = windows.reshape(n, groups, c // groups, k * k, ho, wo)
    weights = kernel.reshape(n, groups, 1, k * k, ho, wo)
    return (windows * weights).sum(dim=3).reshape(n, c, ho, wo)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 conv as one batched matrix product. A bias enters as one more input
    channel of ones (``x`` must carry it as its last channel), so that the output is written in
    one pass; ``x`` may have more columns than the conv's input."""
    weight = conv.weight.flatten(1)
    if conv.bias is not None:
        weight = torch.cat([weight, conv.bias[:, None]], dim=1)
    n, _, h, w = x.shape
    return torch.bmm(weight.expand(n, -1, -1), x.flatten(2)).reshape(n, weight.shape[0], h, w)


@register_block(
    "involution",
    kind="conv",
    paper="Involution: Inverting the Inherence of Convolution for Visual Recognition",
    arxiv="2103.06255",
    year=2021,
    summary="A K x K kernel generated at every position from that position's features, "
    "shared across the channels of a group.",
    notes="channels are preserved; channels must be divisible by group_channels (16). "
    "Computed by offset accumulation (involution2d), not unfold.",
)
class Involution(Block):
    """Involution (Li et al., arXiv 2103.06255).

    Kernel generation from the input itself: ``avg_pool(stride)`` (only for ``stride > 1``, ceil
    mode, so odd sizes give ``ceil(H / stride)`` and the last window averages the valid pixels)
    -> ``1x1 conv C -> C / reduction`` (no bias) + BatchNorm + ReLU -> ``1x1 conv -> K * K * G``
    (with bias), reshaped to ``(N, G, K, K, Ho, Wo)``. The kernel at ``(i, j)`` is applied to the
    ``K x K`` window around input position ``(i * stride, j * stride)`` (zero padding
    ``(K - 1) / 2``), shared by the ``group_channels`` channels of each of the ``G`` groups::

        out[n, g, c, i, j] = sum_{u, v} kernel[n, g, u, v, i, j]
                                        * x[n, g, c, i*s + u - p, j*s + v - p]

    ``G = channels / group_channels``: ``channels`` must be a multiple of ``group_channels``
    (else ``ValueError``; no silent regrouping). Defaults as in the paper's code:
    ``kernel_size = 7``, ``group_channels = 16``, ``reduction = 4`` (reduced width at least 1).

    Shapes: ``(N, C, H, W) -> (N, C, ceil(H / s), ceil(W / s))``; ``out_channels`` must equal
    ``in_channels``. Applied with :func:`involution2d` (offset accumulation, no unfold); on the
    compiled CPU path at stride 1, the operator takes the kernel with each row followed by
    ``(K - 1) / 2`` ignored values, which ``span`` computes directly (see :meth:`_kernel`).
    """

    conv_preservation = (
        "its kernel is shared by all channels of a group and mixes no channels, so it cannot "
        "express a dense convolution's cross-channel weights"
    )

    allowed_strides = (1, 2)
    width = "same"
    width_reason = "preserves the channels"
    compiled_kernels: ClassVar[bool] = True  # blockzoo.ops runs the aggregation where it can

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction: int = 4,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_int(name, "kernel_size", kernel_size, odd=True)
        check_positive_int(name, "group_channels", group_channels)
        self.require(
            in_channels % group_channels == 0,
            f"in_channels ({in_channels}) must be a multiple of group_channels "
            f"({group_channels!r}): G = channels / group_channels kernel groups",
        )
        check_positive_int(name, "reduction", reduction)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        self.kernel_size = kernel_size
        self.group_channels = group_channels
        self.groups = in_channels // group_channels
        self.reduced = max(1, in_channels // reduction)
        self.reduce = ConvNormAct(
            in_channels, self.reduced, 1, norm_layer=norm_layer, act_layer=act_layer
        )
        self.span = nn.Conv2d(self.reduced, kernel_size * kernel_size * self.groups, 1)
        self.place(device, dtype)

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-position kernels ``(N, G, K, K, ceil(H / s), ceil(W / s))`` for input ``x``."""
        return self._kernel(x, 0)

    def _kernel(self, x: torch.Tensor, extra_columns: int) -> torch.Tensor:
        """:meth:`generate_kernel`, or with ``extra_columns`` more (finite, meaningless) values
        after each row: ``span`` then runs on the reduced map padded by columns of ones.

        On that path the two 1x1 convs run as batched matrix products with their parameters
        (unless wrapped or hooked, see :func:`runs_as_matmul`): as fast as oneDNN's convs on
        CPU or faster, the large kernel written once (oneDNN's conv held a second, reordered
        copy of it), and no conv in the graph that ``torch.compile`` would switch to
        channels-last around the custom operator."""
        if self.stride > 1:
            x = ceil_avg_pool(x, self.stride)
        k = self.kernel_size
        if not extra_columns:
            weight = self.span(self.reduce(x))
            return weight.reshape(x.shape[0], self.groups, k, k, weight.shape[2], weight.shape[3])
        reduce = self.reduce
        if (isinstance(reduce, ConvNormAct)
                and runs_as_matmul(reduce, reduce.bn, reduce.act, reduce.conv)
                and reduce.conv.bias is None):
            reduced = reduce.act(reduce.bn(_pointwise(reduce.conv, x)))
        else:
            reduced = reduce(x)
        if runs_as_matmul(self.span):
            ones = 1 if self.span.bias is not None else 0  # a channel of ones for the bias
            padded = F.pad(reduced, (0, extra_columns, 0, 0, 0, ones), value=1.0)
            weight = _pointwise(self.span, padded)
        else:
            weight = self.span(F.pad(reduced, (0, extra_columns)))
        n, _, h, w = weight.shape
        return weight.reshape(n, self.groups, k, k, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.stride == 1 and use_fast_path(x, *self.parameters()):
            # the compiled operator runs on kernel rows padded by (K - 1) / 2 values: made by
            # the 1x1 conv itself here, instead of a padded copy of the kernel
            kernel = self._kernel(x, self.kernel_size // 2)
            if use_fast_path(x, kernel):  # not under autocast, whose conv gives bfloat16
                return involution_aggregate(x, kernel, 1)
            return involution2d(x, kernel[..., :x.shape[3]], 1)
        return involution2d(x, self.generate_kernel(x), self.stride)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generated kernels, ``(N, G, K, K, Ho, Wo)``."""
        self.check_input(x)
        return {ExplainKey.KERNELS: self.generate_kernel(x)}

    def extra_flops(self, x: torch.Tensor) -> int:
        """FLOPs of the aggregation (2 per multiply-add), which FlopCounterMode cannot see.

        Every output value sums ``K * K`` products: ``2 * N * C * Ho * Wo * K * K``; with a
        stride, the kernel generator's ``s x s`` average pool adds one per input value.
        """
        pool = map_elements(x) if self.stride > 1 else 0
        return 2 * (map_elements(x, stride=self.stride) * self.kernel_size**2 + pool)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, groups={self.groups}"
