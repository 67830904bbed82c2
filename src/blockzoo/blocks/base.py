"""The base classes that carry the block contract.

Every block is an ``nn.Module`` with ``in_channels``, ``out_channels`` and ``stride`` attributes
that maps ``(N, in_channels, H, W)`` to ``(N, out_channels, ceil(H / stride), ceil(W / stride))``
and raises a ``ValueError`` naming itself for a wrong argument or input.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.validation import check_positive_int, require
from ..layers import LayerSpec, check_layers


def parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (``None`` if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_input(block: nn.Module, x: object, channels: int) -> None:
    """Raise a ``ValueError`` naming ``block`` unless ``x`` is ``(N, channels, H, W)`` floating
    of the dtype of ``block``'s parameters.

    Under ``torch.autocast`` for ``x``'s device type the operators cast float32 inputs
    themselves, so there a float32 input or one of the autocast dtype is taken too. A block
    without parameters takes any floating dtype.
    """
    name = type(block).__name__
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a tensor of shape (N, {channels}, H, W), got {type(x)}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} expects a 4-D input of shape (N, {channels}, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} expects {channels} input channels, shape (N, {channels}, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    expected = parameter_dtype(block)
    if expected is None or x.dtype == expected:
        return
    device = x.device.type
    # Under autocast the operators cast float32 inputs (and take the autocast dtype itself).
    autocast = torch.is_autocast_enabled(device)
    if not (autocast and x.dtype in (torch.float32, torch.get_autocast_dtype(device))):
        raise ValueError(
            f"{name} has {expected} parameters but got an input of dtype {x.dtype}; "
            f"convert one to the other (x.to({expected}) or block.to({x.dtype}))"
            + ("" if autocast else " or run under torch.autocast")
        )


class Block(nn.Module):
    """Base of every registered block: validated ``in_channels``/``out_channels``/``stride``.

    ``out_channels`` defaults to ``in_channels``. Subclasses call :meth:`check_input` first in
    ``forward`` and :meth:`place` last in ``__init__`` (it applies ``device``/``dtype``). A
    subclass that sets ``allowed_strides`` (e.g. ``(1, 2)``) rejects any other stride, giving
    ``stride_reason`` (e.g. ``"keeps the spatial size"``) in the error when it sets one.
    """

    allowed_strides: tuple[int, ...] | None = None
    stride_reason: str | None = None

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_positive_int(name, "in_channels", in_channels)
        out = in_channels if out_channels is None else out_channels
        self.out_channels = check_positive_int(name, "out_channels", out)
        self.stride = check_positive_int(name, "stride", stride)
        if self.allowed_strides is not None:
            allowed = " or ".join(map(str, self.allowed_strides))
            why = f"{self.stride_reason}, so " if self.stride_reason else ""
            self.require(
                self.stride in self.allowed_strides,
                f"{why}stride must be {allowed}, got {stride}",
            )

    def check_input(self, x: torch.Tensor) -> None:
        check_input(self, x, self.in_channels)

    def check_layers(self, **specs: LayerSpec) -> None:
        """Check ``act_layer=...``/``norm_layer=...`` arguments (see :func:`check_layers`)."""
        check_layers(type(self).__name__, **specs)

    def require(self, condition: bool, message: str) -> None:
        """Raise ``ValueError("<BlockName>: <message>")`` unless ``condition`` holds."""
        require(type(self).__name__, condition, message)

    def place(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Move parameters and buffers to ``device``/``dtype`` when given (end of ``__init__``)."""
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, " \
            f"stride={self.stride}"


class ShapePreservingBlock(Block):
    """A block whose output has its input's shape (the attention blocks).

    Accepts only ``out_channels in (None, in_channels)`` and ``stride == 1``.
    """

    allowed_strides = (1,)
    stride_reason = "keeps the input shape"

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__(in_channels, out_channels, stride)
        self.require(
            self.out_channels == self.in_channels,
            f"keeps the input shape, so out_channels must be None or in_channels "
            f"({in_channels}), got {out_channels}",
        )
