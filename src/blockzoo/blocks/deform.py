"""Deformable convolution, v1 and v2 (modulated), with their own offset predictors.

- Deformable Convolutional Networks, Dai et al., ICCV 2017, arXiv 1703.06211
- Deformable ConvNets v2: More Deformable, Better Results, Zhu et al., CVPR 2019,
  arXiv 1811.11168

The sampling runs on blockzoo's compiled CPU operator (:func:`blockzoo.ops.deform_conv2d`) where
it is available, else on ``torchvision.ops.deform_conv2d``; :func:`deform_conv2d_torch` is the
same operation written with PyTorch tensor ops (bilinear sampling by ``gather``), which exports to
ONNX with dynamic shapes and has a deterministic backward on every device. Non-finite offsets
sample outside the image on every path (the compiled operator tests each point; the others get
:func:`blockzoo.ops.finite_offset`). On the compiled operator the input is taken channels-last
(one copy, which the offset conv also runs faster on) and the result is channels-last.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as _tv_deform_conv2d

from ..core.validation import check_bool, check_choice, check_positive_int
from ..layers import same_padding
from ..ops import deform_conv2d as _fast_deform_conv2d
from ..ops import finite_offset, use_fast_path
from ..registry import register_block
from .base import Block, ExplainKey

IMPLS = ("auto", "torchvision", "torch")

IntPair = int | tuple[int, int]


def _bilinear_corners(
    py: torch.Tensor, px: torch.Tensor, h: int, w: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The four bilinear corners of sampling points ``(py, px)`` on an ``h x w`` image.

    Returns ``(flat_index, weight)`` pairs: ``flat_index = y * w + x`` (0 where the corner lies
    outside the image) and the bilinear weight, zero for a corner outside the image. This is
    torchvision's rule: outside values are zeros, so a point at or beyond ``-1`` or ``h``
    contributes nothing.
    """
    y0, x0 = py.floor(), px.floor()
    ly, lx = py - y0, px - x0
    corners = []
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
            index = torch.where(inside, cy * w + cx, torch.zeros_like(cy)).long()
            corners.append((index, torch.where(inside, wy * wx, torch.zeros_like(wy))))
    return corners


def deform_conv2d_torch(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` in plain PyTorch ops (same arguments, same layouts).

    ``offset`` is ``(N, 2 * G * kh * kw, Ho, Wo)``: for offset group ``g`` and kernel tap
    ``t = i * kw + j`` (row-major), channel ``2 * (g * kh * kw + t)`` is the row offset ``dy`` and
    the next channel the column offset ``dx``. ``mask`` (v2) is ``(N, G * kh * kw, Ho, Wo)``,
    channel ``g * kh * kw + t``. Tap ``t`` of output ``(y, x)`` samples the input bilinearly at
    ``(y * stride - padding + i * dilation + dy, x * stride - padding + j * dilation + dx)`` with
    zeros outside the image, is multiplied by the mask, and the samples are contracted with
    ``weight`` (``groups = C / weight.shape[1]``) as in an im2col convolution; ``bias`` is added
    last (it is not masked).

    Sampling coordinates and bilinear weights are computed in at least float32, also for
    half-precision inputs.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = input.shape
    out_channels, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    groups = c // c_per_group
    ho, wo = offset.shape[-2:]
    offset_groups = offset.shape[1] // (2 * taps)
    coord_dtype = torch.promote_types(offset.dtype, torch.float32)

    off = offset.to(coord_dtype).reshape(n, offset_groups, taps, 2, ho, wo)
    grid = dict(device=input.device, dtype=coord_dtype)
    rows = torch.arange(kh, **grid).repeat_interleave(kw) * dh  # tap t -> i * dilation
    cols = torch.arange(kw, **grid).repeat(kh) * dw  # tap t -> j * dilation
    base_y = rows[:, None, None] + (torch.arange(ho, **grid) * sh - ph)[None, :, None]
    base_x = cols[:, None, None] + (torch.arange(wo, **grid) * sw - pw)[None, None, :]
    py = base_y + off[:, :, :, 0]  # (N, G, taps, Ho, Wo)
    px = base_x + off[:, :, :, 1]

    length = taps * ho * wo
    scale = None if mask is None else mask.to(coord_dtype).reshape(n, offset_groups, 1, length)
    values = input.reshape(n, offset_groups, c // offset_groups, h * w)
    columns = None
    for index, corner_weight in _bilinear_corners(py, px, h, w):
        index = index.reshape(n, offset_groups, 1, length)
        sampled = values.gather(3, index.expand(-1, -1, values.shape[2], -1))
        corner_weight = corner_weight.reshape(n, offset_groups, 1, length)
        if scale is not None:
            corner_weight = corner_weight * scale
        term = sampled * corner_weight.to(input.dtype)
        columns = term if columns is None else columns + term

    # (N, C, taps, L) -> (N, groups, C / groups * taps, L), the order of weight.flatten(1)
    columns = columns.reshape(n, groups, c_per_group * taps, ho * wo)
    kernel = weight.reshape(groups, out_channels // groups, c_per_group * taps)
    out = torch.matmul(kernel, columns).reshape(n, out_channels, ho, wo)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def implementation(impl: str, x: torch.Tensor) -> str:
    """The implementation ``impl`` runs for input ``x``: ``"fast"``, ``"torchvision"`` or
    ``"torch"``.

    ``"auto"`` takes blockzoo's compiled CPU operator where :func:`blockzoo.ops.use_fast_path`
    allows it (CPU, float32/float64, numba installed and not switched off; it is deterministic
    and a single custom operator for ``torch.compile``), else torchvision except where that fails
    or is not what the caller asked for: during ``torch.onnx.export`` (the op becomes ONNX
    ``DeformConv``, an opset-19 operator that is not valid in the opset-18 graphs blockzoo
    exports), for bfloat16 inputs (torchvision's kernels have no bfloat16), and under
    ``torch.use_deterministic_algorithms(True)`` on a non-CPU device (torchvision's CUDA backward
    accumulates with ``atomicAdd`` without checking the flag; its CPU backward is deterministic).
    ``torch.compile(fullgraph=True)`` works with the torchvision op (it has meta kernels), so
    compiling keeps it.
    """
    if impl != "auto":
        return impl
    if use_fast_path(x):
        return "fast"
    if torch.onnx.is_in_onnx_export() or x.dtype == torch.bfloat16:
        return "torch"
    if torch.are_deterministic_algorithms_enabled() and x.device.type != "cpu":
        return "torch"
    return "torchvision"


def uses_torchvision(impl: str, x: torch.Tensor) -> bool:
    """Whether ``impl`` runs ``torchvision.ops.deform_conv2d`` for input ``x``
    (see :func:`implementation`)."""
    return implementation(impl, x) == "torchvision"


_OPS = {
    "fast": _fast_deform_conv2d,
    "torchvision": _tv_deform_conv2d,
    "torch": deform_conv2d_torch,
}


class _DeformConvBase(Block):
    """Shared body of :class:`DeformConv2d` and :class:`ModulatedDeformConv2d`."""

    allowed_strides = (1, 2)
    compiled_kernels: ClassVar[bool] = True  # blockzoo.ops runs the sampling where it can

    modulated = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_int(name, "kernel_size", kernel_size, odd=True)
        check_positive_int(name, "dilation", dilation)
        check_positive_int(name, "groups", groups)
        check_positive_int(name, "offset_groups", offset_groups)
        check_bool(name, "bias", bias)
        self.require(
            in_channels % groups == 0 and self.out_channels % groups == 0,
            f"in_channels ({in_channels}) and out_channels ({self.out_channels}) must be "
            f"divisible by groups ({groups})",
        )
        self.require(
            in_channels % offset_groups == 0,
            f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})",
        )
        check_choice(name, "impl", impl, IMPLS)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.padding = same_padding(kernel_size, dilation)
        self.groups = groups
        self.offset_groups = offset_groups
        self.impl = impl
        taps = kernel_size * kernel_size
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, in_channels // groups, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.offset_conv = nn.Conv2d(
            in_channels,
            (3 if self.modulated else 2) * offset_groups * taps,
            kernel_size,
            stride=stride,
            padding=self.padding,
            dilation=dilation,
        )
        self.reset_parameters()
        self.place(device, dtype)

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation for the kernel; zeros for the offset predictor."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    @torch.no_grad()
    def load_conv(self, conv: nn.Conv2d, scale: float) -> None:
        """Kernel := ``scale * W``, bias := ``b`` (``conv``'s ``W, b``), offset predictor zero."""
        self.require_conv_kernel(conv, self.weight.shape)
        self.weight.copy_(conv.weight * scale)
        if self.bias is not None:
            self.bias.copy_(torch.zeros_like(self.bias) if conv.bias is None else conv.bias)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def offsets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predicted ``offset`` and (v2) sigmoid ``mask`` in torchvision's layout, ``x.dtype``."""
        out = self.offset_conv(x).to(x.dtype)
        if not self.modulated:
            return out, None
        taps = self.offset_groups * self.kernel_size * self.kernel_size
        offset, mask_logits = out.split([2 * taps, taps], dim=1)
        return offset, torch.sigmoid(mask_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        impl = implementation(self.impl, x)
        planar = not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
        if impl == "fast":
            # The compiled operator samples channels-last pixels, and the offset conv is faster
            # on them too: one layout change serves both. It also samples a non-finite point
            # outside the image by itself (zero, zero gradient), so finite_offset is not needed.
            x = x.contiguous(memory_format=torch.channels_last)
        offset, mask = self.offsets(x)
        k = self.kernel_size
        if impl != "fast":
            offset = finite_offset(offset, (k, k), self.stride, self.padding, self.dilation)
        op = _OPS[impl]
        out = op(
            x, offset, self.weight, self.bias, stride=(self.stride, self.stride),
            padding=(self.padding, self.padding), dilation=(self.dilation, self.dilation),
            mask=mask,
        )
        # the output keeps the input's memory format (a planar input gives a planar output,
        # on which .view() works as on torchvision's), as convolutions do
        return out.contiguous() if impl == "fast" and planar else out

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sampling ``offset`` ``(N, 2 * G * k * k, Ho, Wo)`` and, for v2, the ``mask``.

        Layout as in torchvision: ``offset.reshape(N, G, k * k, 2, Ho, Wo)`` gives ``(dy, dx)``
        per offset group and row-major kernel tap; ``mask`` is ``(N, G * k * k, Ho, Wo)``;
        ``sampling_points`` ``(N, Ho, Wo, k * k, 2)`` are the absolute ``(y, x)`` input
        positions that offset group 0 samples for each output position.
        """
        self.check_input(x)
        offset, mask = self.offsets(x)
        n, _, ho, wo = offset.shape
        k = self.kernel_size
        taps = torch.arange(k, device=x.device, dtype=offset.dtype) * self.dilation
        grid_y = torch.arange(ho, device=x.device, dtype=offset.dtype) * self.stride - self.padding
        grid_x = torch.arange(wo, device=x.device, dtype=offset.dtype) * self.stride - self.padding
        base_y = grid_y[:, None, None, None] + taps[None, None, :, None]  # (Ho, 1, k, 1)
        base_x = grid_x[None, :, None, None] + taps[None, None, None, :]  # (1, Wo, 1, k)
        base = torch.stack(torch.broadcast_tensors(base_y, base_x), dim=-1)
        base = base.reshape(ho, wo, k * k, 2)
        delta = offset[:, : 2 * k * k].reshape(n, k * k, 2, ho, wo).permute(0, 3, 4, 1, 2)
        explained = {ExplainKey.OFFSET: offset, ExplainKey.SAMPLING_POINTS: base + delta}
        if mask is not None:
            explained[ExplainKey.MASK] = mask
        return explained

    def extra_flops(self, x: torch.Tensor) -> int:
        """FLOPs (2 per multiply-add) that FlopCounterMode cannot see.

        Bilinear sampling costs 4 multiply-adds per sampled value (plus 1 for the v2 mask):
        ``N * C_in * k * k * Ho * Wo`` values. With torchvision's op the convolution itself is
        invisible too, and so it is inside blockzoo's compiled operator (one custom op):
        ``N * C_out * Ho * Wo * C_in / groups * k * k`` multiply-adds (the pure-PyTorch path does
        it with a matmul, which the counter sees).
        """
        n, c, h, w = x.shape
        outputs = n * (-(-h // self.stride)) * (-(-w // self.stride))
        taps = self.kernel_size**2
        sampling = (5 if self.modulated else 4) * outputs * c * taps
        conv = outputs * self.out_channels * (c // self.groups) * taps
        opaque = implementation(self.impl, x) != "torch"
        return 2 * (sampling + (conv if opaque else 0))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"groups={self.groups}, offset_groups={self.offset_groups}, "
            f"bias={self.bias is not None}, impl={self.impl!r}"
        )


_DEFORM = dict(
    kind="conv",
)


@register_block(
    "deform_conv",
    paper="Deformable Convolutional Networks",
    arxiv="1703.06211",
    year=2017,
    summary="A convolution whose taps sample at learned, per-position fractional offsets.",
    notes="ONNX export uses impl='torch' (plain PyTorch bilinear sampling); impl='auto' also "
    "switches to it while exporting.",
    **_DEFORM,
)
class DeformConv2d(_DeformConvBase):
    """Deformable convolution v1 (Dai et al., arXiv 1703.06211).

    Idea: each of the ``k x k`` taps of a convolution samples the input at a learned offset.
    ``offset = offset_conv(x)`` is a ``k x k`` conv with the block's stride, padding and dilation
    giving ``2 * offset_groups * k * k`` channels; ``y(p) = sum_t w_t * x(p * s + p_t + dp_t(p))
    + b`` with bilinear sampling (zeros outside the image). The offset conv is zero-initialised,
    so a fresh block is exactly the plain convolution with the same ``weight`` and ``bias``.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / s), ceil(W / s))`` with same padding
    ``dilation * (k - 1) / 2``. Defaults: ``kernel_size=3``, ``dilation=1``, ``groups=1``,
    ``offset_groups=1``, ``bias=True``, ``impl="auto"`` (see :func:`implementation`;
    ``"torchvision"`` or ``"torch"`` force one implementation).
    """

    conv_preservation = None

    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Zero offsets sample the regular grid: the conv's weight and bias give the conv
        exactly."""
        self.load_conv(conv, 1.0)


@register_block(
    "mdeform_conv",
    paper="Deformable ConvNets v2: More Deformable, Better Results",
    arxiv="1811.11168",
    year=2019,
    summary="Deformable convolution with a learned sigmoid modulation per tap and position.",
    notes="ONNX export uses impl='torch' (plain PyTorch bilinear sampling); impl='auto' also "
    "switches to it while exporting.",
    **_DEFORM,
)
class ModulatedDeformConv2d(_DeformConvBase):
    """Modulated deformable convolution, DCNv2 (Zhu et al., arXiv 1811.11168).

    Idea: deformable convolution v1 plus a learned modulation scalar per tap and position.
    ``offset_conv(x)`` gives ``3 * offset_groups * k * k`` channels: the first ``2 * G * k * k``
    are the offsets (torchvision layout), the last ``G * k * k`` pass through a sigmoid to give
    the mask ``m``; ``y(p) = sum_t w_t * m_t(p) * x(p * s + p_t + dp_t(p)) + b``. The offset conv
    is zero-initialised, so a fresh block gives ``m = 0.5`` and zero offsets:
    ``y = 0.5 * conv(x, weight) + bias`` (the bias is not modulated), i.e. exactly half the plain
    convolution when ``bias=False``.

    Shapes and defaults as :class:`DeformConv2d`.
    """

    modulated = True
    conv_preservation = None

    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Zero offsets, mask ``sigmoid(0) = 1/2`` everywhere: weight ``2 W`` (exact in floating
        point).

        The bias is not modulated, so it is copied as it is. (A large mask bias would only
        approach ``m = 1``; the factor 2 is exact and keeps the mask's gradient at its largest.)
        """
        self.load_conv(conv, 2.0)

