"""Channel and spatial attention blocks that keep the input's shape.

- Squeeze-and-Excitation Networks, Hu et al., CVPR 2018, arXiv 1709.01507
- GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, Cao et al., 2019,
  arXiv 1904.11492
- Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021,
  arXiv 2103.02907
- CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018, arXiv 1807.06521
- ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks, Wang et al.,
  CVPR 2020, arXiv 1910.03151
- SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks, Yang et
  al., ICML 2021, PMLR 139:11863-11874 (never posted to arXiv; the registry's identifier is the
  PMLR key ``pmlr-v139-yang21o``)

Pooling is written as ``mean``/``sum``/``amax`` reductions (no adaptive-pool modules), so every
block exports to ONNX with dynamic spatial size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.counting import map_elements
from ..core.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_positive_int,
    check_positive_number,
)
from ..layers import ConvNormAct, LayerSpec, create_act, create_norm, make_divisible
from ..registry import register_block
from .base import ExplainKey, ShapePreservingBlock

_ATTENTION = dict(kind="attention")


def reduced_channels(
    owner: str, in_channels: int, reduction: float, rd_channels: int | None, min_channels: int
) -> int:
    """The hidden width of a channel gate: ``rd_channels`` when given, else
    ``make_divisible(in_channels / reduction, 1)`` and at least ``min_channels`` (checked, with
    errors naming ``owner``)."""
    check_positive_number(owner, "reduction", reduction)
    check_positive_int(owner, "min_channels", min_channels)
    if rd_channels is None:
        return make_divisible(in_channels / reduction, 1, min_value=min_channels)
    return check_positive_int(owner, "rd_channels", rd_channels)


@register_block(
    "se",
    paper="Squeeze-and-Excitation Networks",
    arxiv="1709.01507",
    year=2018,
    summary="Reweights channels by a gate computed from globally pooled features.",
    **_ATTENTION,
)
class SqueezeExcite(ShapePreservingBlock):
    """Squeeze-and-Excitation (Hu et al., arXiv 1709.01507).

    ``s = sigmoid(W2 relu(W1 mean_hw(x)))``, ``out = x * s``, with ``W1: C -> C/r`` and
    ``W2: C/r -> C`` as 1x1 convs (with bias). ``r = reduction = 16``; the reduced width is at
    least ``min_channels = 8`` (or exactly ``rd_channels`` when given).

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        reduction: float = 16,
        rd_channels: int | None = None,
        min_channels: int = 8,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        rd_channels = reduced_channels(name, in_channels, reduction, rd_channels, min_channels)
        self.check_layers(act_layer=act_layer, gate_layer=gate_layer)
        self.rd_channels = rd_channels
        self.fc1 = nn.Conv2d(in_channels, rd_channels, 1)
        self.act = create_act(act_layer, inplace=True)  # on fc1's fresh output
        self.fc2 = nn.Conv2d(rd_channels, in_channels, 1)
        self.gate = create_act(gate_layer)
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.gate(self.fc2(self.act(self.fc1(s))))
        return x * s

    def extra_flops(self, x: torch.Tensor) -> int:
        """The squeeze (a mean over positions: one multiply-add per input value) and the
        excitation ``x * s`` (one per output value): ``2 * 2 * N * C * H * W`` FLOPs."""
        return 2 * 2 * map_elements(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate ``s`` of shape ``(N, C)``."""
        self.check_input(x)
        s = x.mean(dim=(2, 3), keepdim=True)
        return {ExplainKey.CHANNEL_GATE: self.gate(self.fc2(self.act(self.fc1(s)))).flatten(1)}


@register_block(
    "gc",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    arxiv="1904.11492",
    year=2019,
    summary="Adds a query-independent global context (softmax-pooled) to every position.",
    **_ATTENTION,
)
class GlobalContext(ShapePreservingBlock):
    """Global context block (Cao et al., arXiv 1904.11492).

    Context modelling: ``pool="att"`` gives ``c = sum_j softmax_j(W_k x_j) x_j`` (softmax over all
    ``H*W`` positions, ``W_k`` a 1x1 conv to one channel); ``pool="avg"`` gives the mean.
    Transform (one per fusion): ``1x1 conv C -> P -> LayerNorm([P, 1, 1]) -> ReLU -> 1x1 conv
    P -> C`` with ``P = int(C * ratio)`` (``ratio = 1/16``). Fusion ``"channel_add"`` (default):
    ``out = x + T_add(c)``; ``"channel_mul"``: ``out = x * sigmoid(T_mul(c))``; both may be used.
    The last conv of every transform is zero-initialised as in the reference code, so a fresh
    ``channel_add`` block is the identity (a fresh ``channel_mul`` block scales by 0.5).

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        ratio: float = 1 / 16,
        pool: str = "att",
        fusion_types: tuple[str, ...] = ("channel_add",),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_choice(name, "pool", pool, ("att", "avg"))
        check_positive_number(name, "ratio", ratio)
        self.require(
            isinstance(fusion_types, (tuple, list))
            and all(isinstance(f, str) for f in fusion_types),
            f"fusion_types must be a tuple of fusion names, got {fusion_types!r}",
        )
        fusion_types = tuple(fusion_types)
        self.require(
            len(fusion_types) > 0
            and set(fusion_types) <= {"channel_add", "channel_mul"}
            and len(set(fusion_types)) == len(fusion_types),
            f"fusion_types must be a non-empty subset of ('channel_add', 'channel_mul'), "
            f"got {fusion_types}",
        )
        self.pool = pool
        self.fusion_types = fusion_types
        self.planes = max(1, int(in_channels * ratio))
        self.conv_mask = nn.Conv2d(in_channels, 1, 1) if pool == "att" else None
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        self.channel_add = self._transform() if "channel_add" in fusion_types else None
        self.channel_mul = self._transform() if "channel_mul" in fusion_types else None
        self.place(device, dtype)

    def _transform(self) -> nn.Sequential:
        last = nn.Conv2d(self.planes, self.in_channels, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(
            nn.Conv2d(self.in_channels, self.planes, 1),
            nn.LayerNorm([self.planes, 1, 1]),
            nn.ReLU(),
            last,
        )

    def attention_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights over positions, ``(N, 1, H, W)``, summing to 1 per sample."""
        n, _, h, w = x.shape
        if self.conv_mask is None:
            return x.new_full((n, 1, h, w), 1.0 / (h * w))
        logits = self.conv_mask(x).reshape(n, 1, h * w)
        return logits.softmax(dim=-1).reshape(n, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.conv_mask is None:
            context = x.mean(dim=(2, 3), keepdim=True)
        else:
            context = (x * self.attention_mask(x)).sum(dim=(2, 3), keepdim=True)
        out = x
        if self.channel_mul is not None:
            out = out * torch.sigmoid(self.channel_mul(context))
        if self.channel_add is not None:
            out = out + self.channel_add(context)
        return out

    def extra_flops(self, x: torch.Tensor) -> int:
        """Context pooling (softmax-weighted or plain mean over positions: one multiply-add per
        input value), then one per output value for each fusion (``x * sigmoid(.)``,
        ``x + T(c)``): ``2 * (1 + fusions) * N * C * H * W`` FLOPs."""
        fusions = (self.channel_mul is not None) + (self.channel_add is not None)
        return 2 * (1 + fusions) * map_elements(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The context mask over positions, ``(N, H, W)``."""
        self.check_input(x)
        return {ExplainKey.CONTEXT_MASK: self.attention_mask(x)[:, 0]}


@register_block(
    "coord_att",
    paper="Coordinate Attention for Efficient Mobile Network Design",
    arxiv="2103.02907",
    year=2021,
    summary="Factorises attention into a height gate and a width gate from 1-D pooled features.",
    **_ATTENTION,
)
class CoordinateAttention(ShapePreservingBlock):
    """Coordinate attention (Hou et al., arXiv 2103.02907).

    ``z_h = mean_w(x)`` ``(N, C, H)`` and ``z_w = mean_h(x)`` ``(N, C, W)`` are concatenated along
    the spatial axis and transformed by a shared ``1x1 conv C -> mip``, BatchNorm and h-swish,
    ``mip = max(min_channels, C / reduction)`` (8 and 32). After the split, ``a_h =
    sigmoid(conv_h(f_h))`` and ``a_w = sigmoid(conv_w(f_w))``; ``out = x * a_h * a_w``.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``. The BatchNorm sees ``N * (H + W) >= 2`` values per
    channel, so batch size 1 trains.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        reduction: float = 32,
        min_channels: int = 8,
        act_layer: LayerSpec = "hard_swish",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_number(name, "reduction", reduction)
        check_positive_int(name, "min_channels", min_channels)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        mip = max(min_channels, int(in_channels // reduction))
        self.mip = mip
        self.conv1 = nn.Conv2d(in_channels, mip, 1)
        self.bn1 = create_norm(norm_layer, mip)
        self.act = create_act(act_layer)
        self.conv_h = nn.Conv2d(mip, in_channels, 1)
        self.conv_w = nn.Conv2d(mip, in_channels, 1)
        self.place(device, dtype)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_h`` of shape ``(N, C, H, 1)`` and ``a_w`` of shape ``(N, C, 1, W)``."""
        h = x.shape[2]
        pooled_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([pooled_h, pooled_w], dim=2))))
        y_h, y_w = y[:, :, :h], y[:, :, h:]
        a_h = torch.sigmoid(self.conv_h(y_h))
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))
        return a_h, a_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        a_h, a_w = self.gates(x)
        return x * a_h * a_w

    def extra_flops(self, x: torch.Tensor) -> int:
        """The two directional poolings (each one multiply-add per input value) and the two
        gate products ``x * a_h * a_w`` (one each per output value): ``2 * 4 * N*C*H*W``."""
        return 2 * 4 * map_elements(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The spatial map ``a_h x a_w`` averaged over channels, ``(N, H, W)``."""
        self.check_input(x)
        a_h, a_w = self.gates(x)
        return {ExplainKey.ATTENTION_MAP: (a_h * a_w).mean(dim=1)}


@register_block(
    "cbam",
    paper="CBAM: Convolutional Block Attention Module",
    arxiv="1807.06521",
    year=2018,
    summary="A channel gate from average- and max-pooled descriptors, then a 7x7 spatial gate.",
    notes="Follows the authors' released code (Jongchan/attention-module, MODELS/cbam.py) where "
    "it is more specific than the paper's figure: the MLP is two Linear layers with bias "
    "(C -> C/16 -> C, ReLU) shared by both descriptors, whose outputs are summed before the "
    "sigmoid; the spatial descriptor is the channel-wise max then mean (ChannelPool's order); "
    "the 7x7 conv (2 -> 1, no bias) is followed by BatchNorm (eps 1e-5, momentum 0.01) and no "
    "ReLU. zero_init_spatial=True zeroes that BN's weight as the authors' ResNet does.",
    **_ATTENTION,
)
class CBAM(ShapePreservingBlock):
    """Convolutional Block Attention Module (Woo et al., arXiv 1807.06521).

    Channel gate: ``M_c = sigmoid(MLP(mean_hw(x)) + MLP(max_hw(x)))`` with one shared ``MLP =
    Linear(C, C/r) -> ReLU -> Linear(C/r, C)`` (``r = reduction = 16``; the reduced width is
    ``make_divisible(C / r, 1)``, the authors' ``C // r`` whenever ``r`` divides ``C``, at
    least ``min_channels = 1``, or ``rd_channels``);
    ``x' = x * M_c``. Spatial gate, applied after: ``M_s = sigmoid(BN(conv7x7([max_c(x');
    mean_c(x')])))``; ``out = x' * M_s``.

    As the authors' code (MODELS/cbam.py): the pooled map stacks the channel max before the
    mean, the 7x7 conv has no bias and its BatchNorm has momentum 0.01 (PyTorch convention) and
    no ReLU after it. Their ResNet initialisation zeroes the spatial BN's weight, so that a fresh
    spatial gate is the constant 0.5: ``zero_init_spatial=True`` does the same.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        reduction: float = 16,
        rd_channels: int | None = None,
        min_channels: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        zero_init_spatial: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        rd_channels = reduced_channels(name, in_channels, reduction, rd_channels, min_channels)
        check_positive_int(name, "spatial_kernel_size", spatial_kernel_size, odd=True)
        check_bool(name, "zero_init_spatial", zero_init_spatial)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        self.rd_channels = rd_channels
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, rd_channels), create_act(act_layer),
            nn.Linear(rd_channels, in_channels),
        )
        self.spatial = ConvNormAct(
            2, 1, spatial_kernel_size, norm_layer=norm_layer, act_layer=None
        )
        if isinstance(self.spatial.bn, nn.modules.batchnorm._BatchNorm):
            self.spatial.bn.momentum = 0.01
            if zero_init_spatial:
                nn.init.zeros_(self.spatial.bn.weight)
        self.place(device, dtype)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c`` of shape ``(N, C)``."""
        descriptors = torch.stack([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (N, 2, C)
        return torch.sigmoid(self.mlp(descriptors).sum(dim=1))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s`` of shape ``(N, 1, H, W)`` for the channel-gated features ``x``."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = x * self.channel_gate(x)[:, :, None, None]
        return x * self.spatial_gate(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate ``M_c`` ``(N, C)`` and the spatial map ``M_s`` ``(N, H, W)``."""
        self.check_input(x)
        gate = self.channel_gate(x)
        return {
            ExplainKey.CHANNEL_GATE: gate,
            ExplainKey.SPATIAL_MAP: self.spatial_gate(x * gate[:, :, None, None])[:, 0],
        }

    def extra_flops(self, x: torch.Tensor) -> int:
        """The average pool over positions, the channel gating, the mean over channels and the
        spatial gating, one multiply-add per value each (the two max poolings are compares, not
        counted): ``2 * 4 * N * C * H * W`` FLOPs. FlopCounterMode counts the MLP and the 7x7
        conv."""
        return 2 * 4 * map_elements(x)


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive 1-D kernel size ``k = |log2(C) / gamma + b / gamma|_odd``.

    ``|t|_odd`` is the odd number nearest to ``t``, computed in the usual integer form
    ``k = int(t)`` if that is odd, else ``int(t) + 1``; this breaks the ties (``t`` an even
    integer, e.g. C = 128) upward. With ``gamma = 2``, ``b = 1``: C = 64 -> 3, 128 -> 5,
    256 -> 5, 512 -> 5, 1024 -> 5, 2048 -> 7. ``math.log2`` is exact at powers of two.
    """
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_block(
    "eca",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    arxiv="1910.03151",
    year=2020,
    summary="Channel gate from a 1-D conv across pooled channels, kernel size adapted to C.",
    notes="Follows the authors' eca_layer (BangguWu/ECANet, models/eca_module.py): global "
    "average pool, Conv1d(1, 1, k, padding (k - 1) // 2, no bias) across the channels, "
    "sigmoid, no reduction. k from the paper's rule (gamma 2, b 1) unless kernel_size is "
    "given; the authors' released ImageNet ECA-ResNet-50 (k3557) uses k = 3 in its first stage "
    "where the rule gives 5.",
    **_ATTENTION,
)
class EfficientChannelAttention(ShapePreservingBlock):
    """Efficient channel attention, ECA (Wang et al., arXiv 1910.03151).

    ``y = mean_hw(x)`` ``(N, C)``; ``s = sigmoid(conv1d_k(y))``, a 1-D convolution of kernel
    ``k`` across the channel axis (zero padding ``(k - 1) / 2``, no bias: ``k`` weights), so
    each channel's gate sees its ``k`` neighbours without dimensionality reduction;
    ``out = x * s``. ``k = kernel_size`` or, when ``None``, :func:`eca_kernel_size` of
    ``in_channels`` with ``gamma = 2``, ``b = 1``.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        check_positive_number(name, "gamma", gamma)
        check_finite_number(name, "b", b)
        if kernel_size is None:
            kernel_size = eca_kernel_size(in_channels, gamma, b)
        else:
            check_positive_int(name, "kernel_size", kernel_size, odd=True)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.place(device, dtype)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` of shape ``(N, C)``.

        ``self.conv``'s weight is applied as a product with the ``k`` zero-padded neighbours of
        every channel: the same numbers as ``self.conv(y[:, None])``, without the large fixed
        cost of oneDNN's conv1d for this single-channel shape on CPU.
        """
        k = self.kernel_size
        pooled = F.pad(x.mean(dim=(2, 3)), ((k - 1) // 2, (k - 1) // 2))  # (N, C + k - 1)
        neighbours = pooled.unfold(1, k, 1)  # (N, C, k)
        return torch.sigmoid((neighbours @ self.conv.weight.reshape(k, 1))[..., 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x * self.channel_gate(x)[:, :, None, None]

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate ``s`` of shape ``(N, C)``."""
        self.check_input(x)
        return {ExplainKey.CHANNEL_GATE: self.channel_gate(x)}

    def extra_flops(self, x: torch.Tensor) -> int:
        """The average pool (one multiply-add per input value) and the gating ``x * s`` (one
        per output value): ``2 * 2 * N * C * H * W`` FLOPs; FlopCounterMode counts the 1-D
        conv."""
        return 2 * 2 * map_elements(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"


@register_block(
    "simam",
    paper="SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
    arxiv="pmlr-v139-yang21o",
    url="https://proceedings.mlr.press/v139/yang21o.html",
    year=2021,
    summary="Parameter-free 3-D weights from each neuron's energy against its channel's others.",
    notes="ICML 2021 (PMLR 139), not on arXiv: the identifier is the PMLR key. Follows the "
    "authors' simam_module (ZjjConan/SimAM): n = H*W - 1, d = (x - mean)^2, "
    "y = d / (4 * (sum(d) / n + e_lambda)) + 0.5, out = x * sigmoid(y), e_lambda = 1e-4 (the "
    "module's default and its CIFAR runs; the README's ImageNet runs pass 0.1). No parameters: "
    "the contract's 'every parameter gets a gradient' holds vacuously (the input gradient is "
    "still checked). For H*W = 1 the code's n = 0 gives 0/0; here n is at least 1, so a "
    "single position gets y = 0.5 (d = 0).",
    **_ATTENTION,
)
class SimAM(ShapePreservingBlock):
    """SimAM (Yang et al., ICML 2021, PMLR 139:11863-11874, ``pmlr-v139-yang21o``; no arXiv id).

    Every neuron ``t`` of a channel gets the inverse of its minimal energy against the other
    ``n = H * W - 1`` neurons of that channel (closed form, Eqn. 6):
    ``d = (t - mu)^2``, ``sigma^2 = sum_hw(d) / n``, ``1/e* = d / (4 (sigma^2 + lambda)) + 0.5``;
    ``out = x * sigmoid(1/e*)``. ``e_lambda`` is ``lambda = 1e-4`` as in the authors' module.
    No parameters. ``n`` is clamped to at least 1, so a 1x1 map (``d = 0``) gets
    ``sigmoid(0.5)`` instead of ``0 / 0``; ``sum(d) / n`` is computed as ``mean(d) * M / n``
    (``M = H * W``), which a float16 map of more than 65,504 positions cannot overflow.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        e_lambda: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        check_positive_number(type(self).__name__, "e_lambda", e_lambda)
        self.e_lambda = e_lambda
        self.place(device, dtype)

    def position_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(1/e*)`` of shape ``(N, C, H, W)``."""
        # M = H * W counted as a tensor (float32 at least), so that jit.trace, torch.compile and
        # ONNX export all keep it dynamic; sum(d) / n is taken as mean(d) * M / n, so that a
        # float16 sum over a large map cannot overflow.
        count_dtype = torch.promote_types(x.dtype, torch.float32)
        positions = x.new_ones((), dtype=count_dtype).expand(x.shape[2], x.shape[3]).sum()
        d = (x - x.mean(dim=(2, 3), keepdim=True)).square()
        variance = d.mean(dim=(2, 3), keepdim=True) * (positions / (positions - 1).clamp_min(1))
        return torch.sigmoid(d / (4 * (variance + self.e_lambda)) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x * self.position_weights(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-position weights ``sigmoid(1/e*)`` averaged over channels, ``(N, H, W)``
        (:meth:`position_weights` gives them all)."""
        self.check_input(x)
        return {ExplainKey.POSITION_WEIGHTS: self.position_weights(x).mean(dim=1)}

    def extra_flops(self, x: torch.Tensor) -> int:
        """One multiply-add per value for each of the mean over positions, ``d = (x - mu)^2``,
        the sum of ``d``, ``d / (4 (sigma^2 + lambda)) + 0.5`` and the gating ``x * sigmoid(.)``:
        ``2 * 5 * N * C * H * W`` FLOPs (the sigmoid is not counted)."""
        return 2 * 5 * map_elements(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, e_lambda={self.e_lambda}"
