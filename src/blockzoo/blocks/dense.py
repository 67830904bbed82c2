"""The DenseNet dense block.

Densely Connected Convolutional Networks, Huang et al., CVPR 2017, arXiv 1608.06993
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.validation import check_bool, check_positive_int
from ..layers import LayerSpec, create_act, create_norm
from ..registry import register_block
from .base import Block


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers on exit: a checkpoint's recomputation must not update
    BatchNorm's running statistics a second time."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class DenseLayer(nn.Module):
    """One DenseNet-BC layer: ``BN-ReLU-Conv1x1(bn_size * growth) - BN-ReLU-Conv3x3(growth)``.

    Its input is the concatenation of a list of feature maps (the block input and every
    earlier layer's output); it returns the ``growth_rate`` new channels. The convolutions
    have no bias (a norm or the next layer's norm follows). With ``memory_efficient`` the
    concatenation, the first norm, activation and 1x1 conv (the "bottleneck", whose
    ``(N, in_channels, H, W)`` intermediates grow with depth) are recomputed in backward
    instead of stored (``torch.utils.checkpoint``, non-reentrant), leaving outputs, gradients
    and running statistics unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        norm_layer: LayerSpec,
        act_layer: LayerSpec,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.memory_efficient = memory_efficient
        self.norm1 = create_norm(norm_layer, in_channels)
        self.act1 = create_act(act_layer)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.norm2 = create_norm(norm_layer, mid)
        self.act2 = create_act(act_layer)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)

    def bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.act1(self.norm1(torch.cat(features, 1))))

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        return contextlib.nullcontext(), _buffers_kept(self.norm1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled():
            # Eager recomputation runs norm1 again: _contexts keeps its running statistics from
            # moving twice. A compiled graph recomputes functionally (buffers untouched).
            kept = {} if torch.compiler.is_compiling() else {"context_fn": self._contexts}
            out = checkpoint(self.bottleneck, *features, use_reentrant=False, **kept)
        else:
            out = self.bottleneck(*features)
        return self.conv2(self.act2(self.norm2(out)))


@register_block(
    "dense",
    kind="block",
    paper="Densely Connected Convolutional Networks",
    arxiv="1608.06993",
    year=2017,
    summary="Each layer sees the concatenation of all earlier outputs and adds growth_rate maps.",
    notes="memory_efficient=True checkpoints only while autograd records (training).",
)
class DenseBlock(Block):
    """Dense block of DenseNet-BC (Huang et al., arXiv 1608.06993).

    ``x_l = H_l([x_0, x_1, ..., x_{l-1}])`` for ``l = 1..num_layers``, where ``[.]`` is channel
    concatenation and ``H_l`` is ``BN-ReLU-Conv1x1(bn_size * growth_rate)-BN-ReLU-Conv3x3
    (growth_rate)`` (:class:`DenseLayer`); the block returns ``[x_0, x_1, ..., x_L]``.

    ``out_channels`` is structural: ``in_channels + num_layers * growth_rate``; passing another
    value is a ``ValueError``. Defaults: ``num_layers=6``, ``growth_rate=32``, ``bn_size=4``,
    DenseNet-121's first block (64 -> 256 channels). The layers are named
    ``layers.{i}.{norm1,conv1,norm2,conv2}`` as torchvision's ``denselayer{i+1}``.
    ``memory_efficient=True`` recomputes each layer's bottleneck in backward
    (:class:`DenseLayer`) to save memory, in eager mode and under ``torch.compile``; it only
    acts while autograd records, so inference and export run the default computation.

    Shapes: ``(N, C_in, H, W) -> (N, C_in + num_layers * growth_rate, H, W)``.
    """

    allowed_strides = (1,)
    stride_reason = "keeps the spatial size"
    width = "structural"

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        num_layers: int = 6,
        growth_rate: int = 32,
        bn_size: int = 4,
        memory_efficient: bool = False,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        self.num_layers = check_positive_int(name, "num_layers", num_layers)
        self.growth_rate = check_positive_int(name, "growth_rate", growth_rate)
        self.bn_size = check_positive_int(name, "bn_size", bn_size)
        check_bool(name, "memory_efficient", memory_efficient)
        self.check_layers(norm_layer=norm_layer, act_layer=act_layer)
        self.derive_out_channels(
            out_channels, in_channels + num_layers * growth_rate,
            "in_channels + num_layers * growth_rate",
        )
        self.memory_efficient = memory_efficient
        self.layers = nn.ModuleList(
            DenseLayer(
                in_channels + i * growth_rate, growth_rate, bn_size, norm_layer, act_layer,
                self.memory_efficient,
            )
            for i in range(num_layers)
        )
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)
