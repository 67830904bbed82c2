"""ACmix: self-attention and convolution sharing one set of 1x1 projections.

On the Integration of Self-Attention and Convolution, Pan et al., CVPR 2022, arXiv 2111.14556

The local window attention is computed offset by offset over the ``k x k`` window
(:func:`local_window_attention`) instead of materialising the unfolded windows of ``k``, ``v``
and the position encoding as the reference code does
(:func:`acmix_attention_unfold_reference`, kept for the tests and the benchmark).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.counting import map_elements
from ..core.validation import check_positive_int
from ..layers import same_padding
from ..ops import grouped_conv2d, use_fast_path, window_attention, window_attention_add_
from ..ops.acmix import reflect_indices
from ..registry import register_block
from .base import Block, ExplainKey, calls_only_forward, runs_as_matmul


def reflect_pad2d(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection-pad the last two dims of ``x`` by ``pad`` (see :func:`reflect_indices`)."""
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    x = x.index_select(-2, reflect_indices(h, pad, x.device))
    return x.index_select(-1, reflect_indices(w, pad, x.device))


def position_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, 2, h, w)`` coordinates in ``[-1, 1]``: channel 0 the column, channel 1 the row.

    ``torch.linspace(-1, 1, n)`` along each axis (``-1`` for ``n = 1``), as in the reference code,
    computed in at least float32 and returned on ``like``'s device and dtype.
    """
    dtype = torch.promote_types(like.dtype, torch.float32)

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, device=like.device, dtype=dtype)
        return i * (2 / i[-1:].clamp_min(1)) - 1

    loc_w = axis(w)[None, :].expand(h, w)
    loc_h = axis(h)[:, None].expand(h, w)
    return torch.stack([loc_w, loc_h])[None].to(like.dtype)


def _window(
    t: torch.Tensor, u: int, v: int, h: int, w: int, dilation: int, stride: int
) -> torch.Tensor:
    """Window position ``(u, v)`` of every output of a padded ``t``: a strided view."""
    rows, cols = u * dilation, v * dilation
    return t[..., rows : rows + h : stride, cols : cols + w : stride]


def window_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    pe: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
) -> torch.Tensor:
    """Softmax weights ``(B, kernel_size^2, Ho, Wo)`` of :func:`local_window_attention`.

    Window positions are row-major. The ``q . pe_q`` term of the scores is the same for every
    window position, so it cancels in the softmax and is not computed.
    """
    pad = dilation * (kernel_size - 1) // 2
    h, w = k.shape[-2:]
    q = q[..., ::stride, ::stride]
    keys = reflect_pad2d(k - pe, pad)
    scores = [
        (q * _window(keys, u, v, h, w, dilation, stride)).sum(1)
        for u in range(kernel_size)
        for v in range(kernel_size)
    ]
    return torch.stack(scores, dim=1).softmax(dim=1)


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
) -> torch.Tensor:
    """ACmix's local window attention without unfolding the windows.

    ``q`` (already scaled), ``k``, ``v``: ``(B, D, H, W)``; ``pe``: ``(1 or B, D, H, W)``.
    Output ``(i, j)`` (on the grid subsampled by ``stride``) attends over the ``kernel_size^2``
    positions ``(i * s + u * d - p, j * s + v * d - p)`` of the reflection-padded ``k`` and ``v``,
    ``p = d * (kernel_size - 1) / 2``, with scores ``q . (k_win + pe_q - pe_win)`` and a softmax
    over the window (:func:`window_attention_weights`). Returns ``(B, D, Ho, Wo)``.

    Memory: the padded ``k - pe`` and ``v`` plus the ``(B, k^2, Ho, Wo)`` attention weights;
    every per-offset operand is a strided view of a padded tensor, so nothing of size
    ``B * D * k^2 * Ho * Wo`` is stored, for the forward or for the backward. On CPU
    (float32/float64) the window sweep is one compiled operator,
    :func:`blockzoo.ops.window_attention` (which pads inside and stores nothing padded);
    elsewhere it is written with PyTorch ops.
    """
    pad = dilation * (kernel_size - 1) // 2
    if use_fast_path(q, k, v, pe):
        if pe.shape[0] != 1:  # a per-sample encoding: subtract it here, the op takes one
            k, pe = k - pe, torch.zeros_like(pe[:1])
        qkv = torch.stack([q, k, v], dim=2).unsqueeze(3)  # (B, D, 3, 1 head, H, W)
        return window_attention(qkv, pe[0], kernel_size, dilation, stride, 1.0)[:, 0]
    h, w = v.shape[-2:]
    att = window_attention_weights(q, k, pe, kernel_size, dilation, stride)
    values = reflect_pad2d(v, pad)
    out = None
    for t in range(kernel_size * kernel_size):
        u, r = divmod(t, kernel_size)
        term = att[:, t : t + 1] * _window(values, u, r, h, w, dilation, stride)
        out = term if out is None else out + term
    return out


def acmix_attention_unfold_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
) -> torch.Tensor:
    """The reference code's attention: unfold the padded ``k``, ``v`` and ``pe`` windows.

    Same arguments and result as :func:`local_window_attention`; materialises
    ``(B, D, kernel_size^2, Ho, Wo)`` tensors for ``k``, ``v`` and the position encoding. Padding
    is :func:`reflect_pad2d` (``nn.ReflectionPad2d`` wherever that is defined).
    """
    pad = dilation * (kernel_size - 1) // 2
    b, d, h, w = q.shape
    ho, wo = -(-h // stride), -(-w // stride)

    def unfold(t: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(reflect_pad2d(t, pad), kernel_size, dilation=dilation, stride=stride)
        return cols.reshape(t.shape[0], d, kernel_size * kernel_size, ho, wo)

    q_att = q[..., ::stride, ::stride]
    q_pe = pe[..., ::stride, ::stride]
    att = (q_att.unsqueeze(2) * (unfold(k) + q_pe.unsqueeze(2) - unfold(pe))).sum(1)
    att = att.softmax(dim=1)
    return (att.unsqueeze(1) * unfold(v)).sum(2)


def shift_kernels(out_channels: int, kernel_size: int) -> torch.Tensor:
    """``(out_channels, k^2, k, k)`` one-hot shift kernels: input ``i`` reads tap ``i``."""
    kernel = torch.zeros(kernel_size * kernel_size, kernel_size, kernel_size)
    for i in range(kernel_size * kernel_size):
        kernel[i, i // kernel_size, i % kernel_size] = 1.0
    return kernel.repeat(out_channels, 1, 1, 1)


@register_block(
    "acmix",
    kind="conv",
    paper="On the Integration of Self-Attention and Convolution",
    arxiv="2111.14556",
    year=2022,
    summary="Shares 1x1 q/k/v projections between local window attention and a shift-kernel conv.",
    notes="out_channels must be divisible by head. dilation dilates the attention window only "
    "(the conv path is never dilated, as in the reference code). Reflection padding is iterated "
    "for inputs smaller than the window (a 1-pixel axis replicates).",
)
class ACmix(Block):
    """ACmix (Pan et al., arXiv 2111.14556).

    Idea: convolution and self-attention both start with 1x1 projections; compute them once and
    mix both aggregations. Stage I: ``q, k, v`` are 1x1 convs (with bias) ``C_in -> C_out``,
    viewed as ``head`` heads of ``D = C_out / head`` channels. Stage II:

    - attention: ``q * D^-0.5`` (subsampled by the stride) attends over the
      ``kernel_att x kernel_att`` window (dilated by ``dilation``) of the reflection-padded
      ``k``/``v`` of its head, scores ``q . (k_win + pe_q - pe_win)``, softmax over the window,
      where ``pe = conv_p(grid)`` is a 1x1 conv ``2 -> D`` on a ``[-1, 1]`` coordinate grid;
    - convolution: ``fc`` (1x1 conv ``3 * head -> kernel_conv^2``, no bias) over ``q, k, v``
      stacked as ``(N, 3 * head, D, H * W)``, regrouped to ``(N, D * kernel_conv^2, H, W)``, then
      ``dep_conv`` (``kernel_conv x kernel_conv``, ``groups=D``, the stride, no bias) whose weights
      start as shift kernels;
    - ``out = rate1 * att + rate2 * conv``, learnable scalars initialised to 0.5.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / s), ceil(W / s))``. Defaults:
    ``kernel_att=7``, ``head=4``, ``kernel_conv=3``, ``dilation=1``. Padding for inputs smaller
    than the window: see :func:`reflect_indices`.
    """

    conv_preservation = (
        "its convolution path is a 1x1 projection of q, k, v followed by grouped shift kernels, "
        "which spans only a subset of dense k x k convolutions, and its attention path is "
        "non-linear"
    )

    allowed_strides = (1, 2)
    compiled_kernels: ClassVar[bool] = True  # blockzoo.ops runs the window attention

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_att: int = 7,
        head: int = 4,
        kernel_conv: int = 3,
        dilation: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_int(name, "kernel_att", kernel_att, odd=True)
        check_positive_int(name, "head", head)
        check_positive_int(name, "kernel_conv", kernel_conv, odd=True)
        check_positive_int(name, "dilation", dilation)
        self.require(
            self.out_channels % head == 0,
            f"out_channels ({self.out_channels}) must be divisible by head ({head})",
        )
        out = self.out_channels
        self.kernel_att = kernel_att
        self.head = head
        self.kernel_conv = kernel_conv
        self.dilation = dilation
        self.head_dim = out // head
        self.conv1 = nn.Conv2d(in_channels, out, 1)
        self.conv2 = nn.Conv2d(in_channels, out, 1)
        self.conv3 = nn.Conv2d(in_channels, out, 1)
        self.conv_p = nn.Conv2d(2, self.head_dim, 1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, 1, bias=False)
        self.dep_conv = nn.Conv2d(
            kernel_conv * kernel_conv * self.head_dim,
            out,
            kernel_conv,
            stride=stride,
            padding=same_padding(kernel_conv),
            groups=self.head_dim,
            bias=False,
        )
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.reset_parameters()
        self.place(device, dtype)

    def reset_parameters(self) -> None:
        """Rates to 0.5 and ``dep_conv`` to shift kernels, as in the reference code."""
        nn.init.constant_(self.rate1, 0.5)
        nn.init.constant_(self.rate2, 0.5)
        with torch.no_grad():
            self.dep_conv.weight.copy_(shift_kernels(self.out_channels, self.kernel_conv))

    def _heads(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scaled ``q`` and ``k`` as ``(N * head, D, H, W)``, and ``pe`` ``(1, D, H, W)``."""
        n, _, h, w = q.shape
        shape = (n * self.head, self.head_dim, h, w)
        pe = self.conv_p(position_grid(h, w, x))
        return q.reshape(shape) * self.head_dim**-0.5, k.reshape(shape), pe

    def conv_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``dep_conv`` over the ``fc``-mixed ``q, k, v``: ``(N, C_out, Ho, Wo)``."""
        n, _, h, w = q.shape
        heads = [t.reshape(n, self.head, self.head_dim, h * w) for t in (q, k, v)]
        f_all = self.fc(torch.cat(heads, dim=1))  # (N, k_conv^2, D, H * W)
        f_conv = f_all.permute(0, 2, 1, 3).reshape(n, self.dep_conv.in_channels, h, w)
        return self.dep_conv(f_conv)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on the compiled window attention, with the same parameters.

        One matrix product computes ``q, k, v`` (the three weights stacked at call time) into
        a ``(N, D, 3, head, H, W)`` layout: the attention operator reads it in place (scaling,
        position encoding and reflection padding inside), and, since each ``dep_conv`` group
        ``d`` reads exactly the 3 * head channels ``(s, head)`` of channel ``d``, ``fc`` followed
        by ``dep_conv`` is one grouped ``kernel_conv x kernel_conv`` convolution over it, with
        weights ``sum_t dep_conv[o, t] * fc[t, j]`` (times ``rate2``): neither the stacked
        ``fc`` input nor its regrouped output is materialised. Without autograd, the operator
        adds ``rate1 * attention`` into the convolution's output in place.
        """
        n, _, h, w = x.shape
        heads, d = self.head, self.head_dim

        def stacked(*tensors: torch.Tensor) -> torch.Tensor:  # rows ordered (d, q/k/v, head)
            t = torch.stack(tensors).unflatten(1, (heads, d))
            return t.movedim(2, 0).flatten(0, 2)

        weight = stacked(self.conv1.weight, self.conv2.weight, self.conv3.weight).flatten(1)
        bias = stacked(self.conv1.bias, self.conv2.bias, self.conv3.bias)
        # 1x1 convolutions as matrix products: PyTorch's 1x1 conv on one thread and a small
        # batch takes a slow path, and torch.compile keeps these planar (see grouped_conv2d)
        qkv = torch.baddbmm(bias[:, None], weight.expand(n, -1, -1), x.flatten(2))
        grid = position_grid(h, w, x).flatten(2)[0]
        pe = torch.addmm(self.conv_p.bias[:, None], self.conv_p.weight.flatten(1), grid)
        conv_weight = torch.einsum(  # contiguous: a strided weight takes a slower conv
            "otkl,tj->ojkl", self.dep_conv.weight, self.fc.weight.flatten(1)
        ).mul(self.rate2).contiguous()
        qkv = qkv.view(n, 3 * self.out_channels, h, w)
        conv = grouped_conv2d(qkv, conv_weight, self.stride, self.dep_conv.padding[0], d)
        qkv, pe = qkv.view(n, d, 3, heads, h, w), pe.view(d, h, w)
        attention = (self.kernel_att, self.dilation, self.stride, d**-0.5)
        if torch.is_grad_enabled() and (conv.requires_grad or qkv.requires_grad):
            att = window_attention(qkv, pe, *attention)
            return torch.addcmul(conv, self.rate1, att.view(conv.shape))
        window_attention_add_(conv, self.rate1, qkv, pe, *attention)  # inference: in place
        return conv

    def _fused_path_applies(self) -> bool:
        """Whether :meth:`fused_forward` may compute from the parameters: the sub-convs are the
        plain ``nn.Conv2d`` the constructor made, with no hooks on them and no global module
        hooks. A hooked, wrapped or replaced sub-module (surgery, feature extraction) makes the
        block run its PyTorch form, which calls every module as itself."""
        projections = (self.conv1, self.conv2, self.conv3, self.conv_p)
        dep = self.dep_conv
        return (
            all(runs_as_matmul(m) and m.bias is not None for m in projections)
            and runs_as_matmul(self.fc) and self.fc.bias is None
            and type(dep) is nn.Conv2d
            and calls_only_forward(dep)
            and dep.bias is None
            and dep.groups == self.head_dim
            and dep.stride == (self.stride, self.stride)
            and dep.dilation == (1, 1)
            and dep.padding == (same_padding(self.kernel_conv),) * 2
            and dep.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # under autocast the projections would hand the operator another dtype
        if (use_fast_path(x, self.conv1.weight) and not torch.is_autocast_enabled(x.device.type)
                and self._fused_path_applies()):
            return self.fused_forward(x)
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        q_att, k_att, pe = self._heads(x, q, k)
        att = local_window_attention(
            q_att, k_att, v.reshape(k_att.shape), pe, self.kernel_att, self.dilation, self.stride
        )
        out_att = att.reshape(q.shape[0], self.out_channels, *att.shape[-2:])
        return self.rate1 * out_att + self.rate2 * self.conv_path(q, k, v)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention weights ``(N, head, kernel_att^2, Ho, Wo)`` and the two ``rates``."""
        self.check_input(x)
        q_att, k_att, pe = self._heads(x, self.conv1(x), self.conv2(x))
        att = window_attention_weights(
            q_att, k_att, pe, self.kernel_att, self.dilation, self.stride
        )
        return {
            ExplainKey.ATTENTION: att.reshape(x.shape[0], self.head, *att.shape[1:]),
            ExplainKey.RATES: torch.cat([self.rate1, self.rate2]).detach(),
        }

    def extra_flops(self, x: torch.Tensor) -> int:
        """FLOPs (2 per multiply-add) of the elementwise work FlopCounterMode cannot see.

        Per value of ``q``/``k`` (``N * C_out * H * W``): the scaling of ``q`` and ``k - pe``.
        Per output value (``N * C_out * Ho * Wo``): ``kernel_att^2`` products for the scores,
        as many for the weighted sum of ``v``, and 2 for ``rate1 * att + rate2 * conv``.
        """
        per_output = 2 * self.kernel_att**2 + 2
        return 2 * (2 * map_elements(x, self.out_channels)
                    + per_output * map_elements(x, self.out_channels, self.stride))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_att={self.kernel_att}, head={self.head}, "
            f"kernel_conv={self.kernel_conv}, dilation={self.dilation}"
        )
