"""Bottleneck and residual blocks: ResNet's bottleneck and basic blocks and ResNeXt's block.

- Deep Residual Learning for Image Recognition, He et al., CVPR 2016, arXiv 1512.03385
- Aggregated Residual Transformations for Deep Neural Networks, Xie et al., CVPR 2017,
  arXiv 1611.05431

One implementation serves all four registered names: ``bottleneck`` is the three-conv body
alone; ``residual`` adds the shortcut, the optional attention block and the ReLU after the add;
``resnext`` is ``residual`` with ``cardinality=32, base_width=4`` (one grouped 3x3 conv);
``basic_residual`` swaps the body for two 3x3 convs. The stride sits on the 3x3 conv (the
"ResNet v1.5" placement of torchvision and of the ResNeXt paper; the original ResNet-50 strides
its first 1x1 conv). ``attention=`` and ``conv=`` name registered blocks, so that networks can
put any attention block after the last BatchNorm (SE-ResNet, GCNet) or any conv-kind block in
place of the 3x3 conv (DY-Conv, SK, involution, ACmix, deformable ResNets).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from ..core.counting import map_elements
from ..core.validation import check_bool, check_options, check_positive_int, close_matches
from ..layers import ConvNormAct, LayerSpec, create_act
from ..registry import block_info, create_block, list_blocks, register_block
from .base import Block

_RESNET_PAPER = dict(
    paper="Deep Residual Learning for Image Recognition", arxiv="1512.03385", year=2016
)
_BLOCK = dict(kind="block")


def _registered(block: Block, option: str, name: str, kind: str) -> None:
    """Raise a ``ValueError`` naming ``block`` unless ``name`` is a registered ``kind`` block."""
    try:
        found = f"a block of kind {block_info(name).kind!r}"
    except (KeyError, TypeError):
        found = "not a registered block" + close_matches(str(name), list_blocks(kind))
    block.require(
        found == f"a block of kind {kind!r}",
        f"{option} must name a registered {kind}-kind block (one of {list_blocks(kind)}), "
        f"got {name!r}: {found}",
    )


def attention_block(
    block: Block, attention: str | None, channels: int, kwargs: dict[str, Any] | None
) -> nn.Module:
    """The attention block registered as ``attention`` over ``channels`` (``None``: identity).

    Raises a ``ValueError`` naming ``block`` when ``attention`` is not an attention-kind block.
    """
    kwargs = check_options(type(block).__name__, "attention_kwargs", kwargs)
    if attention is None:
        block.require(not kwargs, f"attention_kwargs {kwargs} given without an attention block")
        return nn.Identity()
    _registered(block, "attention", attention, "attention")
    return create_block(attention, channels, **kwargs)


def bottleneck_width(
    block: Block,
    out_channels: int,
    expansion: int,
    cardinality: int,
    base_width: int,
) -> int:
    """Width of the 3x3 conv: ``floor(out / expansion * base_width / 64) * cardinality``.

    This is torchvision's ``int(planes * base_width / 64) * groups`` with ``planes = out /
    expansion``: ResNet (``cardinality=1, base_width=64``) gives ``out / 4``; ResNeXt 32x4d gives
    ``4 * 32 = 128`` for ``out = 256``. Every group must get at least one channel.
    """
    owner = type(block).__name__
    check_positive_int(owner, "expansion", expansion)
    check_positive_int(owner, "cardinality", cardinality)
    check_positive_int(owner, "base_width", base_width)
    per_group = out_channels * base_width // (expansion * 64)
    block.require(
        per_group >= 1,
        f"the 3x3 conv gets floor({out_channels} / {expansion} * {base_width} / 64) = 0 channels "
        f"per group; use more out_channels, a larger base_width or a smaller expansion",
    )
    return per_group * cardinality


def conv_unit(
    block: Block,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    *,
    groups: int = 1,
    conv: str | None = None,
    conv_kwargs: dict[str, Any] | None = None,
    norm_layer: LayerSpec = "batchnorm",
    act_layer: LayerSpec = "relu",
) -> ConvNormAct:
    """``conv -> norm -> act`` (:class:`~blockzoo.layers.ConvNormAct`), the conv optionally a block.

    ``conv`` names a registered conv-kind block that takes the place of the ``nn.Conv2d``: it is
    built as ``create_block(conv, in_channels, out_channels, stride, **geometry, **conv_kwargs)``
    where ``geometry`` holds the plain conv's ``kernel_size``, ``groups`` and ``bias`` (no bias
    when a norm follows), each passed only if the block's constructor takes it; ``conv_kwargs``
    win. A grouped conv needs a block that takes ``groups``. This is the one conv-swap mechanism
    of the networks: the bottleneck's 3x3 conv and every conv of the inverted residual block.
    """
    conv_kwargs = check_options(type(block).__name__, "conv_kwargs", conv_kwargs)
    if conv is None:
        block.require(not conv_kwargs, f"conv_kwargs {conv_kwargs} given without a conv block")
        module = None
    else:
        _registered(block, "conv", conv, "conv")
        accepted = inspect.signature(block_info(conv).cls.__init__).parameters
        geometry = {"kernel_size": kernel_size, "groups": groups, "bias": norm_layer is None}
        block.require(
            groups == 1 or "groups" in accepted,
            f"conv={conv!r} takes no groups, so it cannot replace a conv with {groups} groups "
            f"({in_channels} -> {out_channels} channels)",
        )
        kwargs = {k: v for k, v in geometry.items() if k in accepted}
        module = create_block(conv, in_channels, out_channels, stride,
                              **{**kwargs, **conv_kwargs})
    return ConvNormAct(in_channels, out_channels, kernel_size, stride, groups=groups,
                       norm_layer=norm_layer, act_layer=act_layer, conv=module)


def bottleneck_body(
    block: Block,
    width: int,
    *,
    cardinality: int,
    conv: str | None,
    conv_kwargs: dict[str, Any] | None,
    conv_norm_act: bool,
    act_layer: LayerSpec,
    norm_layer: LayerSpec,
) -> nn.Sequential:
    """``conv1`` 1x1 in -> width, ``conv2`` 3x3 (stride, groups) and ``conv3`` 1x1 width -> out.

    Each is conv + norm; ``conv1`` and ``conv2`` are followed by the activation, ``conv3`` is not.
    ``conv`` names a registered conv-kind block that replaces ``conv2``'s convolution (see
    :func:`conv_unit`); the norm and activation follow it unless ``conv_norm_act=False`` (for
    conv blocks that end in their own norm and activation, as SKNet's selective-kernel conv does).
    """
    check_bool(type(block).__name__, "conv_norm_act", conv_norm_act)
    block.check_layers(act_layer=act_layer, norm_layer=norm_layer)
    block.require(conv_norm_act or conv is not None,
                  "conv_norm_act=False needs a conv block (conv=...)")
    keep = conv_norm_act
    conv2 = conv_unit(
        block, width, width, 3, block.stride, groups=cardinality, conv=conv,
        conv_kwargs=conv_kwargs, norm_layer=norm_layer if keep else None,
        act_layer=act_layer if keep else None,
    )
    return nn.Sequential(OrderedDict(
        conv1=ConvNormAct(block.in_channels, width, 1, norm_layer=norm_layer, act_layer=act_layer),
        conv2=conv2,
        conv3=ConvNormAct(width, block.out_channels, 1, norm_layer=norm_layer, act_layer=None),
    ))


@register_block(
    "bottleneck",
    **_RESNET_PAPER,
    summary="1x1 reduce -> 3x3 -> 1x1 expand, each conv + BN (ReLU after the first two).",
    **_BLOCK,
)
class Bottleneck(Block):
    """The ResNet bottleneck without its shortcut (He et al., arXiv 1512.03385, Fig. 5 right).

    ``1x1 conv in -> mid + BN + ReLU -> 3x3 conv mid -> mid (stride) + BN + ReLU -> 1x1 conv
    mid -> out + BN``, no activation at the end. ``mid = out / expansion`` (``expansion = 4``:
    64 -> 256 gives ``mid = 64``); with ``cardinality``/``base_width`` the
    3x3 conv is grouped and ``mid`` follows ResNeXt (see :func:`bottleneck_width`). ``conv``
    names a conv-kind block that replaces the 3x3 conv (see :func:`bottleneck_body`).

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / stride), ceil(W / stride))``, stride 1 or 2.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        expansion: int = 4,
        cardinality: int = 1,
        base_width: int = 64,
        conv: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        conv_norm_act: bool = True,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.width = bottleneck_width(self, self.out_channels, expansion, cardinality, base_width)
        self.body = bottleneck_body(
            self, self.width, cardinality=cardinality, conv=conv, conv_kwargs=conv_kwargs,
            conv_norm_act=conv_norm_act, act_layer=act_layer, norm_layer=norm_layer,
        )
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.body(x)


def residual_shortcut(block: Block, norm_layer: LayerSpec = "batchnorm") -> nn.Module:
    """The shortcut of a residual ``block``: the identity when its shape is kept, else a 1x1 conv
    with the block's stride + norm (the ResNet paper's projection shortcut, option B)."""
    if block.in_channels == block.out_channels and block.stride == 1:
        return nn.Identity()
    return ConvNormAct(block.in_channels, block.out_channels, 1, block.stride,
                       norm_layer=norm_layer, act_layer=None)


class ResidualBlock(Block):
    """Shared by the residual blocks: ``act(attention(body(x)) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 conv (stride) + norm when the shape changes.
    ``zero_init_last`` sets the last norm's weight of the body to zero, so that a fresh block
    computes ``act(shortcut(x))`` (Goyal et al., arXiv 1706.02677).
    """

    allowed_strides = (1, 2)

    def _add_shortcut(
        self,
        body: nn.Sequential,
        *,
        attention: str | None,
        attention_kwargs: dict[str, Any] | None,
        zero_init_last: bool,
        act_layer: LayerSpec,
        norm_layer: LayerSpec,
    ) -> None:
        check_bool(type(self).__name__, "zero_init_last", zero_init_last)
        self.body = body
        self.attention = attention_block(self, attention, self.out_channels, attention_kwargs)
        self.shortcut = residual_shortcut(self, norm_layer)
        self.act = create_act(act_layer, inplace=True)
        if zero_init_last:
            last_norm = body[-1].bn
            self.require(
                getattr(last_norm, "weight", None) is not None,
                f"zero_init_last needs a norm layer with a weight, got {type(last_norm).__name__}",
            )
            nn.init.zeros_(last_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        out = self.attention(self.body(x))
        shortcut = self.shortcut(x)
        if self._add_in_place(x, out, shortcut):
            out += shortcut
        else:
            out = out + shortcut
        return self.act(out)

    def _add_in_place(self, x: torch.Tensor, out: torch.Tensor, shortcut: torch.Tensor) -> bool:
        """Whether the shortcut may be added into the branch output ``out`` in place.

        Only when nothing can read ``out`` afterwards: no forward hook that is handed ``out``
        (see :func:`_hook_may_see_output`) and no global one (a hook may keep the output), the
        same dtype (the sum would otherwise be promoted), not while ``torch.compile`` traces (it
        plans its own buffers), ``out`` not sharing memory with the input ``x``, and with
        autograd, a backward pass that does not read ``out`` (see
        :func:`_backward_reads_output`: the norm that ends a plain branch, the product or sum
        that ends an attention block don't). The sum then takes no new tensor, as torchvision's
        and timm's ``x += shortcut``. The activation after the add runs in place either way.
        """
        if (
            out.dtype != shortcut.dtype
            or torch.compiler.is_compiling()
            or _global_forward_hooks
            or _hook_may_see_output((self.body, self.attention))
            or out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        ):
            return False
        grad = torch.is_grad_enabled() and out.requires_grad
        return not (grad and _backward_reads_output(out))

    def extra_flops(self, x: torch.Tensor) -> int:
        """The shortcut add, one per output value (attention blocks inside declare their own)."""
        return 2 * map_elements(x, self.out_channels, self.stride)


#: Autograd node type -> whether its backward pass reads the tensor the node made.
_READS_OUTPUT: dict[type, bool] = {}


def _backward_reads_output(out: torch.Tensor) -> bool:
    """True when the backward pass may read ``out`` itself, so that it must not be written.

    That is when ``out`` is a view (its base may be saved), or when the operator that made it
    saved its result (PyTorch's generated nodes name it ``_saved_result``: sigmoid, ReLU,
    softmax...) or is a Python ``autograd.Function`` (whose saved tensors are not named). A
    product, sum or norm saves its inputs, not its result. Decided once per node type.
    """
    if out._base is not None:
        return True
    node = out.grad_fn
    if node is None:
        return False
    kind = type(node)
    reads = _READS_OUTPUT.get(kind)
    if reads is None:
        names = dir(node)
        reads = (isinstance(node, torch.autograd.function.BackwardCFunction)
                 or "_saved_result" in names or "_saved_result0" in names)
        _READS_OUTPUT[kind] = reads
    return reads


def _has_forward_hook(module: nn.Module) -> bool:
    """True when ``module`` or any module inside it has a forward hook."""
    if module._forward_hooks:
        return True
    return any(child is not None and _has_forward_hook(child)
               for child in module._modules.values())


#: Modules whose forward returns a new tensor computed from their input, never the input itself.
_FRESH_OUTPUT = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                 nn.Linear)


def _hook_may_see_output(units: Sequence[nn.Module]) -> bool:
    """True when a forward hook may be handed the tensor that the chain ``units`` returns.

    Walking back from the last unit: a conv or norm layer returns a new tensor, so only its own
    hooks matter and the walk stops; an ``nn.Sequential`` is walked the same way inside; any
    other unit (an Identity, an in-place activation, an attention block) may hand its input on,
    so its whole subtree is searched and the walk goes on to the unit before it. A few attribute
    tests for a plain branch, where searching every module of the block on every forward would
    cost more.
    """
    return _walk_back(units) is not False


def _walk_back(units: Sequence[nn.Module]) -> bool | None:
    """``True``: a hook may see the chain's output; ``False``: none can and a unit returned a new
    tensor; ``None``: none found, but the chain may return its input unchanged."""
    for unit in reversed(units):
        if unit._forward_hooks:
            return True
        if isinstance(unit, _FRESH_OUTPUT):
            return False
        if isinstance(unit, nn.Sequential):
            inner = _walk_back(unit)
            if inner is not None:
                return inner
        elif _has_forward_hook(unit):
            return True
    return None


@register_block(
    "residual",
    **_RESNET_PAPER,
    summary="ResNet bottleneck residual block: 1x1-3x3-1x1 + shortcut, ReLU after the add.",
    **_BLOCK,
)
@register_block(
    "resnext",
    paper="Aggregated Residual Transformations for Deep Neural Networks",
    arxiv="1611.05431",
    year=2017,
    summary="ResNeXt block: bottleneck whose 3x3 conv has 32 groups of width 4, + shortcut.",
    preset={"cardinality": 32, "base_width": 4},
    notes="the residual block with the preset cardinality=32, base_width=4.",
    **_BLOCK,
)
class ResidualBottleneck(ResidualBlock):
    """ResNet bottleneck residual block (He et al., arXiv 1512.03385) and ResNeXt block
    (Xie et al., arXiv 1611.05431).

    ``out = relu(attention(F(x)) + shortcut(x))`` with ``F`` the :class:`Bottleneck` body
    ``1x1 (in -> D) + BN + ReLU -> 3x3 (D -> D, stride, groups=cardinality) + BN + ReLU ->
    1x1 (D -> out) + BN``; the shortcut is the identity, or a strided 1x1 conv + BN when the
    shape changes (the paper's option B). The stride is on the 3x3 conv ("ResNet v1.5").

    ``D = floor(out / expansion * base_width / 64) * cardinality`` (torchvision's ``width``):
    ``residual`` (``expansion=4, cardinality=1, base_width=64``) gives ``D = out / 4``, as
    in ResNet-50; ``resnext`` presets ``cardinality=32, base_width=4`` (ResNeXt 32x4d,
    ``D = 128`` for ``out = 256``), the paper's form (c): one grouped conv equal to 32 summed
    paths.

    ``attention`` names an attention-kind block (``"se"``, ``"gc"``, ``"coord_att"``, ...)
    built on ``out`` channels with ``attention_kwargs`` and applied after the last BN, before
    the add (SE-ResNet, GCNet). ``conv`` names a conv-kind block replacing the 3x3 conv (see
    :func:`bottleneck_body`). ``zero_init_last`` zero-initialises the last BN's weight.

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / stride), ceil(W / stride))``, stride 1 or 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        expansion: int = 4,
        cardinality: int = 1,
        base_width: int = 64,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        conv: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        conv_norm_act: bool = True,
        zero_init_last: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.width = bottleneck_width(self, self.out_channels, expansion, cardinality, base_width)
        self.cardinality = cardinality
        body = bottleneck_body(
            self, self.width, cardinality=cardinality, conv=conv, conv_kwargs=conv_kwargs,
            conv_norm_act=conv_norm_act, act_layer=act_layer, norm_layer=norm_layer,
        )
        self._add_shortcut(
            body, attention=attention, attention_kwargs=attention_kwargs,
            zero_init_last=zero_init_last, act_layer=act_layer, norm_layer=norm_layer,
        )
        self.place(device, dtype)


@register_block(
    "basic_residual",
    **_RESNET_PAPER,
    summary="ResNet basic residual block: two 3x3 convs + shortcut, ReLU after the add.",
    **_BLOCK,
)
class BasicResidual(ResidualBlock):
    """ResNet basic residual block (He et al., arXiv 1512.03385, Fig. 5 left; ResNet-18/34).

    ``out = relu(attention(F(x)) + shortcut(x))`` with ``F = 3x3 conv (in -> out, stride) + BN
    + ReLU -> 3x3 conv (out -> out) + BN`` (expansion 1) and the shortcut, attention and
    ``zero_init_last`` options of :class:`ResidualBottleneck`.

    Shapes: ``(N, in, H, W) -> (N, out, ceil(H / stride), ceil(W / stride))``, stride 1 or 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        zero_init_last: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.check_layers(act_layer=act_layer, norm_layer=norm_layer)
        out = self.out_channels
        body = nn.Sequential(OrderedDict(
            conv1=ConvNormAct(
                in_channels, out, 3, stride, norm_layer=norm_layer, act_layer=act_layer
            ),
            conv2=ConvNormAct(out, out, 3, norm_layer=norm_layer, act_layer=None),
        ))
        self._add_shortcut(
            body, attention=attention, attention_kwargs=attention_kwargs,
            zero_init_last=zero_init_last, act_layer=act_layer, norm_layer=norm_layer,
        )
        self.place(device, dtype)
