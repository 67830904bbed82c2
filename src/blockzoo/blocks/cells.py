"""Normal cells found by neural architecture search: NASNet-A and AmoebaNet-A.

- Learning Transferable Architectures for Scalable Image Recognition, Zoph et al., CVPR 2018,
  arXiv 1707.07012
- Regularized Evolution for Image Classifier Architecture Search, Real et al., AAAI 2019,
  arXiv 1802.01548

Both cells take two inputs, the previous cell's output ``x`` (``h_i``) and the one before it
``prev`` (``h_{i-1}``), bring each to the cell width with ``ReLU -> 1x1 conv -> BN``, apply five
pairwise combinations (``op_left(state) + op_right(state)``) and concatenate the states that
the cell does not consume itself. A cell is written as its genotype: the combinations and the
concatenated states, transcribed from the authors' released code (TF-slim ``nasnet_utils``,
tensorflow/tpu ``amoeba_net/model_specs.py``).

Their BatchNorms use epsilon ``norm_eps = 1e-3`` by default, the authors' value (TF-slim's
``nasnet`` arg scope and the tensorflow/tpu AmoebaNet code use ``batch_norm_epsilon=0.001``, and
so does the PyTorch port of the released NASNet weights), not PyTorch's 1e-5: with 1e-5 the
outputs of weights trained with 1e-3 move by about 1e-2.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.counting import map_elements
from ..core.validation import check_positive_int, check_positive_number
from ..layers import ConvNormAct, LayerSpec, create_act
from ..registry import register_block
from .base import Block
from .separable import SeparableConv

#: An operation on a state: ``(op, state index)``; ops are ``"sep3x3"``, ``"sep5x5"`` (ReLU ->
#: separable conv -> BN, twice), ``"avg3x3"``, ``"max3x3"`` (stride 1, padding 1; the average
#: excludes the padding, as TF's ``SAME`` pooling) and ``"identity"``. States: 0 is ``x`` after
#: its 1x1 conv, 1 is ``prev`` after its 1x1 conv, ``2 + j`` is combination ``j``.
Operand = tuple[str, int]


def relu_sepconv_bn(
    channels: int,
    kernel_size: int,
    repeats: int = 2,
    act_layer: LayerSpec = "relu",
    norm_layer: LayerSpec = "batchnorm",
) -> nn.Sequential:
    """NASNet's separable op: ``ReLU -> SeparableConv(k x k) -> BN``, ``repeats`` times.

    Each :class:`SeparableConv` is depthwise ``k x k`` + pointwise 1x1 (``channels ->
    channels``, no bias) with nothing in between, followed by its BatchNorm.
    """
    layers: list[nn.Module] = []
    for _ in range(repeats):
        layers += [
            create_act(act_layer),
            SeparableConv(
                channels, channels, kernel_size=kernel_size, norm_layer=norm_layer, act_layer=None
            ),
        ]
    return nn.Sequential(*layers)


def _operation(op: str, channels: int, act_layer: LayerSpec, norm_layer: LayerSpec) -> nn.Module:
    if op == "identity":
        return nn.Identity()
    if op == "avg3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if op == "max3x3":
        return nn.MaxPool2d(3, stride=1, padding=1)
    kernel = {"sep3x3": 3, "sep5x5": 5}[op]
    return relu_sepconv_bn(channels, kernel, act_layer=act_layer, norm_layer=norm_layer)


class _NormalCell(Block):
    """A normal cell given by its genotype (``combinations``, ``concat``); see the subclasses."""

    allowed_strides = (1,)
    stride_reason = "a normal cell keeps the spatial size"
    width = "structural"

    combinations: ClassVar[tuple[tuple[Operand, Operand], ...]]
    concat: ClassVar[tuple[int, ...]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        prev_channels: int | None = None,
        cell_channels: int | None = None,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        norm_eps: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        check_positive_number(name, "norm_eps", norm_eps)
        self.prev_channels = (
            in_channels if prev_channels is None
            else check_positive_int(name, "prev_channels", prev_channels)
        )
        num_states = len(self.concat)
        self.cell_channels = (
            max(1, in_channels // num_states) if cell_channels is None
            else check_positive_int(name, "cell_channels", cell_channels)
        )
        self.derive_out_channels(
            out_channels, num_states * self.cell_channels,
            f"{num_states} concatenated states x cell_channels {self.cell_channels}",
        )
        c = self.cell_channels

        def relu_conv_bn(c_in: int) -> nn.Sequential:
            conv_bn = ConvNormAct(c_in, c, 1, norm_layer=norm_layer, act_layer=None)
            return nn.Sequential(create_act(act_layer), conv_bn)

        self.preprocess_x = relu_conv_bn(in_channels)
        self.preprocess_prev = relu_conv_bn(self.prev_channels)
        self.ops = nn.ModuleList(
            nn.ModuleList(_operation(op, c, act_layer, norm_layer) for op, _ in pair)
            for pair in self.combinations
        )
        self.norm_eps = norm_eps
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = norm_eps
        self.place(device, dtype)

    def _check_prev(self, x: torch.Tensor, prev: object) -> None:
        name = type(self).__name__
        expected = f"(N, {self.prev_channels}, H, W)"
        if not isinstance(prev, torch.Tensor):
            raise ValueError(f"{name} expects prev of shape {expected}, got {type(prev)}")
        if prev.dim() != 4 or prev.shape[1] != self.prev_channels:
            raise ValueError(
                f"{name} expects prev of shape {expected}, got shape {tuple(prev.shape)}"
            )
        if not prev.is_floating_point():
            raise ValueError(f"{name} expects a floating-point prev, got dtype {prev.dtype}")
        if prev.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{name} expects prev of x's dtype {x.dtype}, got dtype {prev.dtype}")
        if prev.shape[0] != x.shape[0] or prev.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"{name}: a normal cell keeps the spatial size, so prev must have the batch "
                f"size and H, W of x; got x of shape {tuple(x.shape)} and prev of shape "
                f"{tuple(prev.shape)}"
            )

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` is ``h_i`` (``in_channels``), ``prev`` is ``h_{i-1}`` (``prev_channels``, same
        N, H, W; defaults to ``x``, which needs ``prev_channels == in_channels``)."""
        self.check_input(x)
        if prev is None:
            self.require(
                self.prev_channels == self.in_channels,
                f"prev defaults to x, which has {self.in_channels} channels, but prev_channels "
                f"is {self.prev_channels}; pass prev of shape (N, {self.prev_channels}, H, W)",
            )
            prev = x
        else:
            self._check_prev(x, prev)
        states = [self.preprocess_x(x), self.preprocess_prev(prev)]
        for (left, right), ((_, i), (_, j)) in zip(self.ops, self.combinations, strict=True):
            states.append(left(states[i]) + right(states[j]))
        return torch.cat([states[k] for k in self.concat], 1)

    def extra_flops(self, x: torch.Tensor) -> int:
        """Each combination's add (one per value of a ``cell_channels`` state) and each 3x3
        average pool's terms: ``(3H - 2)(3W - 2)`` per channel and sample, padding excluded.
        Max pooling compares and is not counted."""
        n, _, h, w = x.shape
        state = map_elements(x, self.cell_channels)
        pools = sum(op == "avg3x3" for pair in self.combinations for op, _ in pair)
        return 2 * (len(self.combinations) * state
                    + pools * n * self.cell_channels * (3 * h - 2) * (3 * w - 2))


_CELL = dict(
    kind="cell",
    notes="two inputs: forward(x, prev=None); the contract runs it with prev = x.",
)


@register_block(
    "nasnet_normal_cell",
    paper="Learning Transferable Architectures for Scalable Image Recognition",
    arxiv="1707.07012",
    year=2018,
    summary="NASNet-A normal cell: five searched sep-conv/pool/identity pairs, concatenated.",
    **_CELL,
)
class NASNetNormalCell(_NormalCell):
    """NASNet-A normal cell (Zoph et al., arXiv 1707.07012, Fig. 4 left).

    With ``h0 = BN(conv1x1(ReLU(x)))`` and ``h1 = BN(conv1x1(ReLU(prev)))``, both
    ``cell_channels`` wide, and ``sepK`` = (ReLU -> separable K x K -> BN) twice::

        c0 = sep5(h0) + sep3(h1)      c1 = sep5(h1) + sep3(h1)
        c2 = avg3(h0) + h1            c3 = avg3(h1) + avg3(h1)
        c4 = sep3(h0) + h0
        out = concat(h1, c0, c1, c2, c3, c4)

    as in TF-slim's ``NasNetANormalCell`` (``hiddenstate_indices``, ``used_hiddenstates``) and
    Cadene's PyTorch port. ``out_channels = 6 * cell_channels`` (structural). Both inputs always
    get their 1x1 conv (as in the PyTorch ports; slim skips it for ``prev`` when the widths
    already match). Drop-path is left to the network. Defaults: ``prev_channels = in_channels``,
    ``cell_channels = in_channels // 6`` (a cell fed by such cells keeps the width ``6F``).

    Shapes: ``(N, C_in, H, W)`` and ``prev (N, C_prev, H, W) -> (N, 6 * cell_channels, H, W)``.
    """

    combinations = (
        (("sep5x5", 0), ("sep3x3", 1)),
        (("sep5x5", 1), ("sep3x3", 1)),
        (("avg3x3", 0), ("identity", 1)),
        (("avg3x3", 1), ("avg3x3", 1)),
        (("sep3x3", 0), ("identity", 0)),
    )
    concat = (1, 2, 3, 4, 5, 6)


@register_block(
    "amoebanet_normal_cell",
    paper="Regularized Evolution for Image Classifier Architecture Search",
    arxiv="1802.01548",
    year=2019,
    summary="AmoebaNet-A normal cell: evolved sep-conv/pool/identity pairs, concatenated.",
    **_CELL,
)
class AmoebaNetNormalCell(_NormalCell):
    """AmoebaNet-A normal cell (Real et al., arXiv 1802.01548, Fig. 4, the normal cell).

    With ``h0``, ``h1`` and ``sepK`` as in :class:`NASNetNormalCell` (same search space)::

        c0 = avg3(h0) + max3(h0)      c1 = sep3(h1) + h1
        c2 = h0 + avg3(h1)            c3 = sep3(h0) + sep5(c0)
        c4 = avg3(c3) + sep3(h0)
        out = concat(h1, c1, c2, c4)

    c0 and c3 feed later combinations and are not concatenated (the released
    ``amoeba_net_a`` spec of tensorflow/tpu: ``hiddenstate_indices [0, 0, 1, 1, 0, 1, 0, 2, 5,
    0]``, ``used_hiddenstates [1, 0, 1, 0, 0, 1, 0]``). ``out_channels = 4 * cell_channels``
    (structural). Defaults: ``prev_channels = in_channels``, ``cell_channels = in_channels // 4``.

    Shapes: ``(N, C_in, H, W)`` and ``prev (N, C_prev, H, W) -> (N, 4 * cell_channels, H, W)``.
    """

    combinations = (
        (("avg3x3", 0), ("max3x3", 0)),
        (("sep3x3", 1), ("identity", 1)),
        (("identity", 0), ("avg3x3", 1)),
        (("sep3x3", 0), ("sep5x5", 2)),
        (("avg3x3", 5), ("sep3x3", 0)),
    )
    concat = (1, 3, 4, 6)
