"""The skeleton every blockzoo network shares: stem -> stages -> head.

:class:`StagedNet` holds the stem, the stages (four for the ImageNet networks) and the classifier
head, validates the input, and implements ``features_only`` (the list of the stage outputs, for
detection and segmentation necks) once for every builder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..blocks.base import check_input
from ..core.validation import (
    check_bool,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
    require,
)
from ..layers import ConvNormAct
from ..registry import block_info, list_blocks


def check_positive_ints(owner: str, name: str, values: Sequence[int], length: int) -> tuple:
    """``values`` as a tuple of ``length`` positive ints, else a ``ValueError`` naming ``owner``."""
    require(owner, isinstance(values, Sequence) and not isinstance(values, str),
            f"{name} must be {length} positive integers, got {values!r}")
    values = tuple(values)
    require(owner, len(values) == length,
            f"{name} must be {length} positive integers, got {values!r}")
    for value in values:
        check_positive_int(owner, name, value)
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
        check_positive_int(owner, "in_chans", in_chans)
        check_non_negative_int(owner, "num_classes", num_classes)
        check_bool(owner, "features_only", features_only)
        check_fraction(owner, "drop_rate", drop_rate)
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
        check_input(self, x, self.in_chans)
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last stage output: ``fc(dropout(mean_hw(head_conv(x))))``."""
        x = self.head_conv(x).mean(dim=(2, 3))
        return self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.forward_features(x)
        if self.features_only:
            return features
        return self.forward_head(features[-1])


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
