"""The skeleton every blockzoo network shares: stem -> stages -> head.

:class:`StagedNet` holds the stem, the stages (four for the ImageNet networks) and the classifier
head, validates the input, and implements timm's model API once for every builder:
``forward_features`` (the final feature map), ``forward_head`` (pooling, dropout, classifier),
``get_classifier``/``reset_classifier``, ``feature_info`` and ``features_only`` with
``out_indices`` (the list of the chosen stage outputs, for detection and segmentation necks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..blocks.base import calls_only_forward, check_input, named_open_modules
from ..core.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
    require,
)
from ..layers import ConvNormAct

#: Global pooling types of the head (timm's names): average, max, their mean, or none (``""``:
#: ``forward`` then returns the unpooled map, or with ``num_classes > 0`` the classifier applied
#: at every position, ``(N, num_classes, h, w)``).
GLOBAL_POOLS = ("avg", "max", "avgmax", "")


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


class FeatureInfo(list):
    """One dict per feature output: ``num_chs`` (channels), ``reduction`` (stride w.r.t. the
    input) and ``module`` (the name of the module that produces it), with timm's accessors
    ``channels()``, ``reduction()`` and ``module_name()`` (a list, or one value for ``idx``).
    """

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """The ``key`` of every output, or of output(s) ``idx``."""
        if idx is None:
            return [info[key] for info in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)


def _resolve_out_indices(owner: str, out_indices: Sequence[int] | None, n: int) -> tuple:
    """``out_indices`` as sorted non-negative stage indices (negative ones count from the end)."""
    if out_indices is None:
        return tuple(range(n))
    indices = tuple(out_indices)
    require(
        owner,
        len(indices) >= 1
        and all(isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in indices),
        f"out_indices must be stage indices in {-n}..{n - 1}, got {indices!r}",
    )
    resolved = tuple(sorted({i % n for i in indices}))
    require(owner, len(resolved) == len(indices), f"out_indices repeat a stage: {indices!r}")
    return resolved


class StagedNet(nn.Module):
    """``stem -> stages -> head_conv -> global pool -> dropout -> fc``, with timm's model API.

    ``stages`` is a list of ``nn.Sequential`` (four for the ImageNet networks, three for
    ``sknet_cifar``) whose last module has ``out_channels``. ``stem_stride`` and each stage's
    stride give ``feature_strides``, the reduction of every stage output (``[4, 8, 16, 32]`` for
    the ImageNet networks).

    - ``forward_features(x)``: the final feature map ``(N, num_features, H / 32, W / 32)`` (the
      last stage, through ``head_conv`` where the network has one, as MobileNetV2's 1x1 conv to
      1280 channels);
    - ``forward_head(x, pre_logits=False)``: global pool (``global_pool``: ``"avg"``,
      ``"max"``, ``"avgmax"`` or ``""`` for none) -> dropout -> ``fc``; ``pre_logits=True``
      stops before ``fc`` (``(N, num_features)``);
    - ``forward(x)``: ``forward_head(forward_features(x))``, the logits ``(N, num_classes)``
      (``num_classes=0``: the pooled features; ``global_pool=""``: the unpooled map, or the
      classifier applied at every position, ``(N, num_classes, h, w)``);
    - ``features_only=True``: the head is not built, the stages after the last of
      ``out_indices`` neither, and ``forward`` returns the list of the stage outputs chosen by
      ``out_indices`` (default: all; negative indices count from the end);
    - ``feature_info``: a :class:`FeatureInfo` (channels, reduction, module name) of the stage
      outputs ``forward`` returns with ``features_only`` (of every stage otherwise);
    - ``get_classifier()``, ``reset_classifier(num_classes, global_pool=None)``: the classifier,
      and a new one (on the network's device and dtype, in its train/eval mode; the other
      parameters keep their ``requires_grad``).

    Attributes: ``stage_channels`` and ``feature_strides`` (of the built stages),
    ``stage_depths`` (blocks per stage of the whole network, built or not),
    ``num_features`` and ``head_hidden_size`` (the width the classifier sees), ``in_chans``,
    ``num_classes``, ``global_pool``, ``drop_rate``, ``features_only``, ``out_indices``.
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
        out_indices: Sequence[int] | None = None,
        head_conv: nn.Module | None = None,
        head_channels: int | None = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "in_chans", in_chans)
        self._check_head(num_classes, global_pool)
        check_bool(owner, "features_only", features_only)
        require(owner, features_only or out_indices is None,
                "out_indices selects the outputs of features_only=True; it was given without it")
        check_fraction(owner, "drop_rate", drop_rate)
        require(owner, len(stages) == len(stage_strides) >= 1,
                 f"needs at least one stage and one stride per stage, got {len(stages)} stages "
                 f"and strides {tuple(stage_strides)}")
        self.out_indices = _resolve_out_indices(owner, out_indices, len(stages))
        self.stage_depths = [len(stage) for stage in stages]
        if features_only:
            stages = stages[: self.out_indices[-1] + 1]
            stage_strides = stage_strides[: len(stages)]
        self.in_chans = in_chans
        self.features_only = features_only
        self.num_classes = 0 if features_only else num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [int(stage[-1].out_channels) for stage in stages]
        strides, total = [], stem_stride
        for s in stage_strides:
            total *= s
            strides.append(total)
        self.feature_strides = strides
        self.num_features = self.head_hidden_size = head_channels or self.stage_channels[-1]
        shown = self.out_indices if features_only else range(len(stages))
        self.feature_info = FeatureInfo(
            {"num_chs": self.stage_channels[i], "reduction": strides[i], "module": f"stages.{i}"}
            for i in shown
        )
        if features_only:
            self.head_conv = self.drop = self.fc = None
        else:
            self.head_conv = head_conv if head_conv is not None else nn.Identity()
            self.drop = nn.Dropout(drop_rate)
            self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _check_head(self, num_classes: int, global_pool: str | None) -> None:
        owner = type(self).__name__
        check_non_negative_int(owner, "num_classes", num_classes)
        if global_pool is not None:
            check_choice(owner, "global_pool", global_pool, GLOBAL_POOLS)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of every built stage, at strides ``feature_strides``."""
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map ``(N, num_features, h, w)``: the last stage (+ ``head_conv``)."""
        x = self._run_stages(x, keep_all=False)[-1]
        return x if self.head_conv is None else self.head_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``fc(dropout(pool(x)))`` from the final feature map; ``pre_logits``: without ``fc``."""
        if self.fc is None:
            raise ValueError(f"{type(self).__name__}: built with features_only=True, it has no "
                             f"head")
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.global_pool == "max":
            x = x.amax(dim=(2, 3))
        elif self.global_pool == "avgmax":
            x = 0.5 * (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
        x = self.drop(x)
        if pre_logits:
            return x
        if x.dim() == 4:  # no pooling: the classifier at every position
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            features = self.forward_stages(x)
            return [features[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier (``nn.Linear``, or ``nn.Identity`` with ``num_classes=0``)."""
        if self.fc is None:
            raise ValueError(f"{type(self).__name__}: built with features_only=True, it has no "
                             f"classifier")
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none), and ``global_pool`` unless ``None``.

        The new ``nn.Linear`` is built on the network's device and dtype, in its train/eval
        mode, with PyTorch's default initialisation; no other parameter changes.
        """
        if self.fc is None:
            raise ValueError(f"{type(self).__name__}: built with features_only=True, it has no "
                             f"classifier to reset")
        self._check_head(num_classes, self.global_pool if global_pool is None else global_pool)
        if global_pool is not None:
            self.global_pool = global_pool
        reference = next(self.parameters(), None)
        place: dict[str, Any] = {} if reference is None else {
            "device": reference.device, "dtype": reference.dtype}
        fc = nn.Linear(self.num_features, num_classes, **place) if num_classes else nn.Identity()
        self.fc = fc.train(self.training)
        self.num_classes = num_classes
        cfg = getattr(self, "default_cfg", None)
        if isinstance(cfg, dict):
            cfg["num_classes"] = num_classes


def runs_as_plain_sequential(module: nn.Module) -> bool:
    """True when calling ``module`` would do nothing but ``nn.Sequential.forward``: an
    ``nn.Sequential`` (not a subclass) that :func:`~blockzoo.blocks.base.calls_only_forward`."""
    return type(module) is nn.Sequential and calls_only_forward(module)


def init_conv_norm_act(model: nn.Module) -> None:
    """He (fan-out) initialisation of the ``nn.Conv2d`` of every ``ConvNormAct`` (conv -> norm ->
    act) of the network, as torchvision's ResNet and MobileNetV2 initialise their convs; norms
    keep weight 1 and bias 0 (or what ``zero_init_last`` set).

    Convolutions inside atomic blocks (conv, downsample and attention kinds; see
    :func:`~blockzoo.blocks.base.named_open_modules`) keep their block's own initialisation (SK's
    fuse layers drawn from N(0, 0.01), involution's kernel generator, ACmix's shift kernels,
    dynamic-conv experts, GC's zero-initialised transform, deformable offsets, SPD-Conv's conv),
    and so does the classifier.
    """
    for _, module in named_open_modules(model):
        if isinstance(module, ConvNormAct) and isinstance(module.conv, nn.Conv2d):
            nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
            if module.conv.bias is not None:
                nn.init.zeros_(module.conv.bias)
