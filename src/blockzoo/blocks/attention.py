"""Channel and spatial attention blocks that keep the input's shape.

- Squeeze-and-Excitation Networks, Hu et al., CVPR 2018, arXiv 1709.01507
- GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, Cao et al., 2019,
  arXiv 1904.11492
- Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021,
  arXiv 2103.02907

Pooling is written as ``mean``/``sum`` reductions (no adaptive-pool modules), so every block
exports to ONNX with dynamic spatial size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.counting import map_elements
from ..core.validation import check_choice, check_positive_int, check_positive_number
from ..layers import LayerSpec, create_act, create_norm, make_divisible
from ..registry import register_block
from .base import ExplainKey, ShapePreservingBlock

_ATTENTION = dict(kind="attention")


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
        check_positive_number(name, "reduction", reduction)
        check_positive_int(name, "min_channels", min_channels)
        self.check_layers(act_layer=act_layer, gate_layer=gate_layer)
        if rd_channels is None:
            rd_channels = make_divisible(in_channels / reduction, 1, min_value=min_channels)
        else:
            check_positive_int(name, "rd_channels", rd_channels)
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
