"""The model registry: named network configurations, their paper figures and training notes.

A named model is a *configuration*: a builder (:class:`~blockzoo.models.resnet.ResNetLike`,
:class:`~blockzoo.models.mobilenet.MobileNetV2`, ...) plus the keyword arguments that make it the
network a paper published. :func:`register_model` records it with its ``default_cfg`` (input
size, normalisation, the paper's figures and training notes), :func:`create_model` builds it.

``default_cfg`` keys (every model has all of them; ``None`` where a paper gives no figure):

- ``input_size``: ``(C, H, W)`` the network is trained and evaluated at;
- ``mean``, ``std``: per-channel input normalisation;
- ``num_classes``: the classifier's size (as built: ``create_model(num_classes=...)`` sets it);
- ``paper``, ``arxiv``: the paper the configuration follows;
- ``paper_params_m``: the paper's parameter count in millions, classifier included;
- ``paper_gmacs``: the paper's compute in billions of multiply-adds at ``input_size`` (papers
  call them FLOPs; blockzoo's FLOPs are 2 per multiply-add, so compare with ``flops / 2``);
- ``paper_top1``: the paper's ImageNet top-1 accuracy (%), single 224 crop unless ``notes`` say;
- ``training``: the paper's training recipe, as far as the paper states it;
- ``notes``: the layout built and where it departs from (or goes beyond) the paper.

:func:`create_model` adds two keys that depend on what was built:

- ``architecture``: the registered name;
- ``temperature_schedule``: ``blockzoo.blocks.dynamic.DY_CONV_TEMPERATURE.as_dict()`` (DY-Conv's
  annealing of the softmax temperature, the arguments of :class:`blockzoo.TemperatureSchedule`)
  when the model holds dynamic convolutions (also when they were asked for with
  ``conv="dynamic_conv"``), else ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from ..blocks.dynamic import DY_CONV_TEMPERATURE, DynamicConv2d
from ..registry import unknown_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CFG_KEYS = (
    "input_size", "mean", "std", "num_classes", "paper", "arxiv", "paper_params_m",
    "paper_gmacs", "paper_top1", "training", "notes",
)

_MODELS: dict[str, ModelInfo] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of one named model: its builder, configuration and cfg."""

    name: str
    builder: Callable[..., nn.Module]
    config: Mapping[str, Any]
    default_cfg: Mapping[str, Any]

    @property
    def summary(self) -> str:
        """``"<builder>(<config>)"``: the configuration the name stands for."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{self.builder.__name__}({args})"


def default_cfg(
    *,
    paper: str,
    arxiv: str,
    paper_params_m: float | None,
    paper_gmacs: float | None = None,
    paper_top1: float | None = None,
    training: str = "",
    notes: str = "",
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    num_classes: int = 1000,
) -> dict[str, Any]:
    """A complete ``default_cfg`` dict (see the module docstring for the keys)."""
    return dict(
        input_size=input_size, mean=mean, std=std, num_classes=num_classes, paper=paper,
        arxiv=arxiv, paper_params_m=paper_params_m, paper_gmacs=paper_gmacs,
        paper_top1=paper_top1, training=training, notes=notes,
    )


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    cfg: Mapping[str, Any],
    **config: Any,
) -> ModelInfo:
    """Register ``builder(**config)`` as ``name`` with its ``default_cfg`` ``cfg``.

    ``cfg`` must have exactly the keys of :func:`default_cfg`. Returns the :class:`ModelInfo`.
    """
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    if set(cfg) != set(CFG_KEYS):
        raise ValueError(
            f"default_cfg of {name!r} must have the keys {CFG_KEYS}, got {tuple(cfg)}"
        )
    info = ModelInfo(name, builder, MappingProxyType(dict(config)), MappingProxyType(dict(cfg)))
    _MODELS[name] = info
    return info


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; ``KeyError`` with close matches if unknown."""
    if name not in _MODELS:
        raise unknown_name("model", name, _MODELS, "blockzoo.list_models()")
    return _MODELS[name]


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    features_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name``.

    ``kwargs`` override the registered configuration (e.g. ``conv="dynamic_conv"``,
    ``attention="se"``, ``layers=(2, 2, 2, 2)``). ``features_only=True`` builds the backbone
    alone: its forward returns the list of the 4 stage outputs, with ``model.stage_channels``
    channels at strides ``model.feature_strides``. The model carries ``default_cfg`` (a dict, see
    this module's docstring) with ``num_classes`` and ``input_size`` set to what was built.
    """
    info = model_info(name)
    model = info.builder(
        **{**info.config, **kwargs}, num_classes=num_classes, in_chans=in_chans,
        features_only=features_only,
    )
    cfg = dict(info.default_cfg)
    cfg["num_classes"] = 0 if features_only else num_classes
    cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    if in_chans != len(cfg["mean"]):
        cfg["mean"], cfg["std"] = (0.5,) * in_chans, (0.5,) * in_chans
    cfg["architecture"] = name
    dynamic = any(isinstance(m, DynamicConv2d) for m in model.modules())
    cfg["temperature_schedule"] = DY_CONV_TEMPERATURE.as_dict() if dynamic else None
    model.default_cfg = cfg
    return model
