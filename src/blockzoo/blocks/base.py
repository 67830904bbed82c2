"""The base classes that carry the block contract.

Every block is an ``nn.Module`` with ``in_channels``, ``out_channels`` and ``stride`` attributes
that maps ``(N, in_channels, H, W)`` to ``(N, out_channels, ceil(H / stride), ceil(W / stride))``
and raises a ``ValueError`` naming itself for a wrong argument or input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from ..core.validation import check_positive_int, require
from ..layers import LayerSpec, check_layers
from ..registry import block_info, list_blocks


def parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (``None`` if it has none).

    A depth-first walk that stops at the first parameter (a few microseconds: it runs in every
    forward), in the order of ``module.parameters()``.
    """
    stack = [module]
    while stack:
        current = stack.pop()
        for p in current._parameters.values():
            if p is not None and p.is_floating_point():
                return p.dtype
        stack.extend(reversed(current._modules.values()))
    return None


def calls_only_forward(*modules: nn.Module) -> bool:
    """True when calling each of ``modules`` would do nothing but its ``forward``: no forward or
    backward hooks on them, no global module hooks, and ``torch.jit`` not tracing (tracing
    records module scopes through the call). Only then may a fast path compute from their
    parameters, or run their children, without calling them."""
    return (
        not (_global_forward_pre_hooks or _global_forward_hooks
             or _global_backward_pre_hooks or _global_backward_hooks)
        and not any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                    or m._backward_hooks for m in modules)
        and not torch.jit.is_tracing()
    )


def runs_as_matmul(*modules: nn.Module) -> bool:
    """Whether ``modules[-1]``, a 1x1 conv, may run as a matrix product with its parameters:
    a plain ``nn.Conv2d`` (stride 1, no groups, padding or dilation), and nothing but the
    forward of any of ``modules`` (the conv and the modules called around it) would run if they
    were called (see :func:`calls_only_forward`; a wrapped, replaced or hooked conv runs as
    itself)."""
    conv = modules[-1]
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and calls_only_forward(*modules)
    )


Width = Literal["free", "same", "structural"]


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


class ExplainKey:
    """Names of the entries of :meth:`Block.explain`, shared with ``tools/viz.py``.

    A block returns the entries that describe what it computed; the visualiser draws the ones
    it knows by these names and leaves the others out.
    """

    #: ``(N, H, W)`` softmax weights over positions (GC's context mask).
    CONTEXT_MASK = "context_mask"
    #: ``(N, H, W)`` a spatial attention map averaged over channels (coordinate attention).
    ATTENTION_MAP = "attention_map"
    #: ``(N, H, W)`` a spatial gate (CBAM's spatial attention).
    SPATIAL_MAP = "spatial_map"
    #: ``(N, H, W)`` per-position weights averaged over channels (SimAM).
    POSITION_WEIGHTS = "position_weights"
    #: ``(N, C)`` a per-channel gate (SE, ECA, CBAM's channel attention).
    CHANNEL_GATE = "channel_gate"
    #: ``(N, K)`` routing weights over expert kernels (dynamic and conditional convolution).
    ROUTING_WEIGHTS = "routing_weights"
    #: ``(N, M, C)`` per-branch weights, softmax over the branches (selective kernel).
    BRANCH_WEIGHTS = "branch_weights"
    #: Generated or aggregated kernels: involution ``(N, G, K, K, Ho, Wo)``, dynamic
    #: convolution ``(N, C_out, C_in / g, k, k)``.
    KERNELS = "kernels"
    #: ``(N, heads, K * K, Ho, Wo)`` local window attention weights (ACmix).
    ATTENTION = "attention"
    #: ``(N, Ho, Wo, K * K, 2)`` absolute ``(y, x)`` input positions sampled (deformable conv).
    SAMPLING_POINTS = "sampling_points"
    #: ``(N, 2 * G * K * K, Ho, Wo)`` raw sampling offsets (deformable conv).
    OFFSET = "offset"
    #: ``(N, G * K * K, Ho, Wo)`` modulation mask (deformable conv v2).
    MASK = "mask"
    #: ``(2,)`` the mixing rates of two paths (ACmix's attention and convolution).
    RATES = "rates"


class Block(nn.Module):
    """Base of every registered block: validated ``in_channels``/``out_channels``/``stride``.

    A block's own rules live on its class:

    - ``allowed_strides`` (e.g. ``(1, 2)``): any other stride is a ``ValueError``, giving
      ``stride_reason`` (e.g. ``"keeps the spatial size"``) when set;
    - ``width``: how ``out_channels`` is set. ``"free"``: any value, default ``in_channels``;
      ``"same"``: must equal ``in_channels`` (``width_reason`` says why); ``"structural"``: the
      block derives it from its configuration and calls :meth:`derive_out_channels`;
    - ``conv_preservation``: why the block cannot start as an arbitrary ``nn.Conv2d``
      (function-preserving surgery), or ``None`` where :meth:`init_from_conv` implements it;
    - :meth:`explain` and :meth:`extra_flops`: what the visualiser draws and the FLOPs the
      counter cannot see.

    Subclasses call :meth:`check_input` first in ``forward`` and :meth:`place` last in
    ``__init__`` (it applies ``device``/``dtype``).
    """

    allowed_strides: ClassVar[tuple[int, ...] | None] = None
    stride_reason: ClassVar[str | None] = None
    width: ClassVar[Width] = "free"
    width_reason: ClassVar[str] = "keeps the channel count"

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
        if self.width == "same":
            self.require(
                self.out_channels == self.in_channels,
                f"{self.width_reason}, so out_channels must be None or in_channels "
                f"({in_channels}), got {out_channels}",
            )

    def derive_out_channels(self, requested: int | None, derived: int, rule: str) -> None:
        """Set a structural block's ``out_channels`` to ``derived`` (computed as ``rule``).

        ``requested`` (the constructor's ``out_channels``) may only be ``None`` or ``derived``.
        """
        self.require(
            requested is None or requested == derived,
            f"out_channels is structural ({rule} = {derived}); pass None or {derived}, "
            f"got {requested}",
        )
        self.out_channels = derived

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

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the block computes on ``x``, as tensors named by :class:`ExplainKey`.

        The base class explains nothing (an empty dict); blocks with attention maps, gates,
        routing weights, kernels or sampling points override it.
        """
        self.check_input(x)
        return {}

    def extra_flops(self, x: torch.Tensor) -> int:
        """FLOPs (2 per multiply-add) of work ``FlopCounterMode`` cannot see, for input ``x``.

        Convolutions and matrix products are counted by the counter; a block declares here the
        elementwise multiply-adds that scale with ``H x W x C`` (see docs/profiling.md). The
        base class declares none.
        """
        return 0

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, " \
            f"stride={self.stride}"

    # Model surgery (blockzoo.surgery): how the block takes a plain conv's place.

    #: Why the block cannot start as an arbitrary dense ``nn.Conv2d`` (function-preserving
    #: surgery refuses it with this reason); ``None`` for a class that implements
    #: :meth:`init_from_conv`.
    conv_preservation: ClassVar[str | None] = (
        "blockzoo has no initialiser that makes it equal an arbitrary nn.Conv2d"
    )
    #: True when ``norm_layer``/``act_layer`` act on the block's output (``... -> norm -> act``):
    #: put in place of a conv that a norm layer follows, the block is built without them.
    ends_with_norm_act: ClassVar[bool] = False

    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Make this freshly built block compute exactly what ``conv`` computes.

        The block has the conv's channels, stride, kernel size, dilation and groups. The base
        class raises a ``ValueError`` giving :attr:`conv_preservation`.
        """
        raise ValueError(
            f"{type(self).__name__}: cannot take over a convolution's weights: "
            f"{self.conv_preservation}"
        )

    def require_conv_kernel(self, conv: nn.Conv2d, kernel_shape: torch.Size) -> None:
        """For :meth:`init_from_conv`: the block's kernel must have the conv's weight shape,
        and a conv with a bias needs the block's ``bias``."""
        self.require(
            kernel_shape == conv.weight.shape,
            f"its kernel has shape {tuple(kernel_shape)}, the conv's {tuple(conv.weight.shape)} "
            f"(different kernel_size or groups in the block's options?)",
        )
        self.require(
            conv.bias is None or getattr(self, "bias", None) is not None,
            "the conv has a bias and the block was built with bias=False",
        )


class ShapePreservingBlock(Block):
    """A block whose output has its input's shape (the attention blocks).

    Accepts only ``out_channels in (None, in_channels)`` and ``stride == 1``.
    """

    allowed_strides = (1,)
    stride_reason = "keeps the input shape"
    width = "same"
    width_reason = "keeps the input shape"


#: Registry kinds whose blocks are atomic: their submodules are the block's own machinery.
ATOMIC_KINDS = ("attention", "conv", "downsample")


def named_open_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``(qualified name, module)`` below ``model`` except the insides of sealed modules.

    Sealed are blocks registered under an :data:`ATOMIC_KINDS` kind (a deformable conv's offset
    predictor, SE's 1x1 convs, SK's fuse layers are the block's machinery) and modules whose
    class sets ``sealed = True`` (model surgery's ``GatedResidual``); composite blocks (kinds
    ``block`` and ``cell``, such as a bottleneck) are opened like any other module, and so is
    ``model`` itself. A module used at several places (shared, tied) is listed at every path.
    Model surgery matches, and a network's initialisation re-draws, only what this lists.
    """
    kinds = {block_info(name).cls: block_info(name).kind for name in list_blocks()}

    def sealed(module: nn.Module) -> bool:
        if getattr(type(module), "sealed", False) is True:
            return True
        kind = next((kinds[c] for c in type(module).__mro__ if c in kinds), None)
        return kind in ATOMIC_KINDS

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for key, child in module._modules.items():  # not named_children(): it skips repeats
            if child is not None:
                yield prefix + key, child
                if not sealed(child):
                    yield from walk(child, f"{prefix}{key}.")

    return list(walk(model, ""))
