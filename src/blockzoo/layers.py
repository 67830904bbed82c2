"""Small layers and helpers shared by every block family.

One vocabulary for every block: ``act_layer`` and ``norm_layer`` are given as a class, a
callable or a string (see :func:`get_act_layer` and :func:`get_norm_layer`); reduced widths come
from :func:`make_divisible`; convolutions that keep the output-size rule
``ceil(H / stride)`` use :func:`same_padding`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .core.validation import check_layer_spec

LayerSpec = str | type[nn.Module] | Callable[..., nn.Module] | None


def make_divisible(
    value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, at least ``min_value``.

    As in MobileNet and timm: the result never falls below ``round_limit * value`` (it is then
    bumped up by one ``divisor``). ``divisor=1`` rounds to the nearest integer.
    """
    min_value = min_value if min_value is not None else divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that makes a convolution's output ``ceil(H / stride)`` for odd kernels."""
    if kernel_size % 2 == 0:
        raise ValueError(f"same padding needs an odd kernel size, got {kernel_size}")
    return dilation * (kernel_size - 1) // 2


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays defined when a training batch has one value per channel.

    PyTorch raises for ``N * H * W == 1`` in training mode (batch size 1 on a pooled or 1x1 map).
    Such a batch is normalised here with the running statistics, exactly as in eval mode, and
    leaves them untouched; every other batch behaves exactly like ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eval mode and ordinary batches pay one attribute test; the shape product is computed
        # only in training mode.
        if (
            self.training
            and self.running_mean is not None
            and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] == 1
        ):
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )
        return super().forward(x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an ``(N, C, H, W)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class HardSigmoid(nn.Module):
    """``relu6(x + 3) / 6``, written out so every exporter sees the same arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class HardSwish(nn.Module):
    """``x * relu6(x + 3) / 6`` (MobileNetV3's h-swish, used by coordinate attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": HardSigmoid,
    "hard_swish": HardSwish,
    "h_swish": HardSwish,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


#: Activations whose ``inplace=True`` form autograd supports: the backward pass reads the result
#: (ReLU, ReLU6, LeakyReLU, ELU, ...) or autograd keeps the input it needs (SiLU, Hardswish, Mish).
_INPLACE_ACTIVATIONS = frozenset({
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish,
})


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    groups = 32 if num_channels % 32 == 0 else 1
    return nn.GroupNorm(groups, num_channels, **kwargs)


_NORMS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": BatchNorm2d,
    "bn": BatchNorm2d,
    "groupnorm": _group_norm,
    "gn": _group_norm,
    "layernorm": LayerNorm2d,
    "ln": LayerNorm2d,
    "identity": nn.Identity,
}


def _resolve(spec: LayerSpec, table: dict, name: str, what: str) -> Callable[..., nn.Module]:
    instances = table is _ACTIVATIONS
    check_layer_spec("blockzoo", name, spec, table, what=what, instances=instances)
    if spec is None:
        return nn.Identity
    if isinstance(spec, str):
        return table[spec.lower().replace("-", "_")]
    if isinstance(spec, nn.Module):  # an activation instance: a fresh copy for every use
        return functools.partial(copy.deepcopy, spec)
    return spec


def check_layers(owner: str, **specs: LayerSpec) -> None:
    """Check ``act_layer=...``/``norm_layer=...`` specs, naming ``owner`` and the argument.

    An argument whose name contains ``norm`` is a norm spec (no module instances), any other
    an activation spec (an instance is accepted and copied for every use).
    """
    for name, spec in specs.items():
        if "norm" in name:
            check_layer_spec(owner, name, spec, _NORMS, what="norm layer", instances=False)
        else:
            check_layer_spec(owner, name, spec, _ACTIVATIONS, what="activation", instances=True)


def get_act_layer(spec: LayerSpec) -> Callable[..., nn.Module]:
    """Turn ``"relu"``, ``"silu"``, ``"hard_swish"``, ... or a class into an activation factory.

    ``None`` gives ``nn.Identity``. Calling the factory with no argument builds the module. An
    activation instance (``nn.ReLU()``, ``nn.LeakyReLU(0.1)``) gives a factory of deep copies.
    """
    return _resolve(spec, _ACTIVATIONS, "act_layer", "activation")


def get_norm_layer(spec: LayerSpec) -> Callable[..., nn.Module]:
    """Turn ``"batchnorm"``, ``"groupnorm"``, ``"layernorm"`` or a class into a norm factory.

    The factory is called with the number of channels. ``"batchnorm"`` is blockzoo's
    :class:`BatchNorm2d` (defined for a single value per channel); ``None`` gives ``nn.Identity``.
    A module instance is refused: a norm layer is built for a channel count.
    """
    return _resolve(spec, _NORMS, "norm_layer", "norm layer")


def create_act(spec: LayerSpec, *, inplace: bool = False) -> nn.Module:
    """Build an activation module from a spec (see :func:`get_act_layer`).

    ``inplace=True`` builds torch's ReLU, ReLU6, SiLU, LeakyReLU, ELU, CELU, SELU, Hardtanh,
    Hardswish, Hardsigmoid and Mish with ``inplace=True`` (other activations ignore it): only for
    an input that nothing else reads afterwards, such as the fresh output of a norm layer or of a
    residual sum, never a block's input or a tensor an attention gate multiplies.
    """
    factory = get_act_layer(spec)
    if inplace and factory in _INPLACE_ACTIVATIONS:
        return factory(inplace=True)
    return factory()


def create_norm(spec: LayerSpec, num_channels: int) -> nn.Module:
    """Build a norm module over ``num_channels`` from a spec (see :func:`get_norm_layer`)."""
    factory = get_norm_layer(spec)
    return factory() if factory is nn.Identity else factory(num_channels)


class ConvNormAct(nn.Sequential):
    """``Conv2d -> norm -> act`` with same padding: output ``ceil(H / stride)``.

    The conv has no bias when a norm follows it. Submodules are named ``conv``, ``bn`` and
    ``act`` so that weights can be found by name. ``conv`` may be given as a module that stands
    in for the ``nn.Conv2d`` of this geometry (a conv-kind block, see
    :func:`blockzoo.blocks.residual.conv_unit`); it is used as it is. After a norm layer the
    activation runs in place on the norm's output (see :func:`create_act`), as torchvision's and
    timm's networks do: the norm's backward pass does not read its output, and no temporary is
    allocated. A forward hook on ``bn`` that keeps its output therefore sees the activated values.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        bias: bool | None = None,
        conv: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if bias is None:
            bias = norm_layer is None
        self.conv = conv if conv is not None else nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=same_padding(kernel_size, dilation),
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.bn = create_norm(norm_layer, out_channels)
        self.act = create_act(act_layer, inplace=not isinstance(self.bn, nn.Identity))
