"""The skeleton every blockzoo network shares: stem -> stages -> head.

:class:`StagedNet` holds the stem, the stages (four for the ImageNet networks) and the classifier
head, validates the input, and implements ``features_only`` (the list of the stage outputs, for
detection and segmentation necks) once for every builder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from ..blocks.base import check_input
from ..core.validation import require
from ..layers import ConvNormAct
from ..registry import block_info, list_blocks


def check_positive_ints(owner: str, name: str, values: Sequence[int], length: int) -> tuple:
    """``values`` as a tuple of ``length`` positive ints, else a ``ValueError`` naming ``owner``."""
    values = tuple(values)
    require(
        owner,
        len(values) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values),
        f"{name} must be {length} positive integers, got {values!r}",
    )
    return values


class StagedNet(nn.Module):
    """``stem -> stages -> head_conv -> global average pool -> dropout -> fc``.

    ``stages`` is a list of ``nn.Sequential`` (four for the ImageNet networks, three for
    ``sknet_cifar``) whose last module has ``out_channels``. ``stem_stride`` and each stage's
    stride give ``feature_strides``, the reduction of every stage output (``[4, 8, 16, 32]`` for
    the ImageNet networks). With ``features_only=True`` the head is not built and ``forward``
    returns the list of the stage outputs; otherwise it returns the logits
    ``(N, num_classes)`` (``num_classes=0``: the pooled features).

    Attributes: ``stage_channels`` (the channels of the stage outputs), ``feature_strides``,
    ``num_features`` (the width the classifier sees), ``in_chans``, ``num_classes``,
    ``features_only``.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Sequential],
        *,
        stem_stride: int,
        stage_strides: Sequence[int],
        in_chans: int,
        num_classes: int,
        features_only: bool,
        head_conv: nn.Module | None = None,
        head_channels: int | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_ints(owner, "in_chans", (in_chans,), 1)
        require(
            owner,
            isinstance(num_classes, int) and not isinstance(num_classes, bool)
            and num_classes >= 0,
            f"num_classes must be a non-negative integer, got {num_classes!r}",
        )
        require(owner, isinstance(features_only, bool),
                 f"features_only must be a bool, got {features_only!r}")
        require(owner, 0.0 <= drop_rate < 1.0, f"drop_rate must be in [0, 1), got {drop_rate}")
        require(owner, len(stages) == len(stage_strides) >= 1,
                 f"needs at least one stage and one stride per stage, got {len(stages)} stages "
                 f"and strides {tuple(stage_strides)}")
        self.in_chans = in_chans
        self.features_only = features_only
        self.num_classes = 0 if features_only else num_classes
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [int(stage[-1].out_channels) for stage in stages]
        strides, total = [], stem_stride
        for s in stage_strides:
            total *= s
            strides.append(total)
        self.feature_strides = strides
        self.num_features = head_channels or self.stage_channels[-1]
        if features_only:
            self.head_conv = self.drop = self.fc = None
        else:
            self.head_conv = head_conv if head_conv is not None else nn.Identity()
            self.drop = nn.Dropout(drop_rate)
            self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs, at strides ``feature_strides``."""
        return self._run_stages(x, keep_all=True)

    def _run_stages(self, x: torch.Tensor, keep_all: bool) -> list[torch.Tensor]:
        """Stem and stages; every stage output when ``keep_all``, else the last one alone.

        A module call keeps its input alive until it returns, so ``stage(x)`` would hold the
        stage's input (for the first stage, the large stem output) through all of the stage's
        blocks. A plain ``nn.Sequential`` stage with no hooks is therefore run here block by
        block, which is what its call would do, and its input is released after the first
        block; a stage with hooks (or under global module hooks or ``torch.jit`` tracing) is
        called as a module.
        """
        check_input(self, x, self.in_chans)
        x = self.stem(x)
        features = []
        for stage in self.stages:
            if runs_as_plain_sequential(stage):
                for block in stage:
                    x = block(x)
            else:
                x = stage(x)
            if keep_all:
                features.append(x)
        return features if keep_all else [x]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last stage output: ``fc(dropout(mean_hw(head_conv(x))))``."""
        x = self.head_conv(x).mean(dim=(2, 3))
        return self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self._run_stages(x, keep_all=True)
        return self.forward_head(self._run_stages(x, keep_all=False)[-1])


def runs_as_plain_sequential(module: nn.Module) -> bool:
    """True when calling ``module`` would do nothing but ``nn.Sequential.forward``.

    That is: ``module`` is an ``nn.Sequential`` (not a subclass), has no forward or backward
    hooks, no global module hooks are registered and ``torch.jit`` is not tracing (tracing
    records module scopes through the call).
    """
    return (
        type(module) is nn.Sequential
        and not (module._forward_pre_hooks or module._forward_hooks
                 or module._backward_pre_hooks or module._backward_hooks)
        and not (_global_forward_pre_hooks or _global_forward_hooks
                 or _global_backward_pre_hooks or _global_backward_hooks)
        and not torch.jit.is_tracing()
    )


def init_conv_norm_act(model: nn.Module) -> None:
    """He (fan-out) initialisation of the ``nn.Conv2d`` of every ``ConvNormAct`` (conv -> norm ->
    act) of the network, as torchvision's ResNet and MobileNetV2 initialise their convs; norms
    keep weight 1 and bias 0 (or what ``zero_init_last`` set).

    Convolutions inside conv-kind and attention-kind blocks keep their block's own
    initialisation (SK's fuse layers drawn from N(0, 0.01), involution's kernel generator,
    ACmix's shift kernels, dynamic-conv experts, GC's zero-initialised transform, deformable
    offsets), and so does the classifier.
    """
    owners = tuple(
        block_info(name).cls for kind in ("conv", "attention") for name in list_blocks(kind)
    )
    sealed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in sealed):
            continue
        if isinstance(module, owners):
            sealed.append(name + ".")
        elif isinstance(module, ConvNormAct) and isinstance(module.conv, nn.Conv2d):
            nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
            if module.conv.bias is not None:
                nn.init.zeros_(module.conv.bias)
