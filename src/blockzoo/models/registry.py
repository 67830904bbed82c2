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
- ``notes``: the layout built and where it departs from (or goes beyond) the paper;
- ``interpolation``, ``crop_pct``: the evaluation resize (timm's names: resize the shorter side
  to ``input_size / crop_pct`` with ``interpolation``, centre-crop ``input_size``);
- ``weights``: the checkpoints the authors released, as
  :class:`~blockzoo.models.pretrained.ReleasedWeights` (where, reported accuracy, license,
  SHA-256 where known, key layout); empty when none exist;
- ``layouts``: further key layouts (:data:`~blockzoo.models.pretrained.LAYOUTS`) the network
  reads besides blockzoo's and its released checkpoints' (e.g. the authors' training code's,
  when they released no checkpoint).

:func:`create_model` adds the keys that depend on what was built:

- ``architecture``: the registered name;
- ``pool_size``: the final feature map's size at ``input_size``; ``first_conv`` and
  ``classifier``: the names of the first convolution and of the classifier (timm's keys);
- ``min_input_size``: ``(in_chans, 32, 32)``, the smallest input at which every stride-32 stage
  output is a full (not padding-only) window; the networks accept any size;
- ``temperature_schedule``: ``blockzoo.blocks.dynamic.DY_CONV_TEMPERATURE.as_dict()`` (DY-Conv's
  annealing of the softmax temperature, the arguments of :class:`blockzoo.TemperatureSchedule`)
  when the model holds dynamic convolutions (also when they were asked for with
  ``conv="dynamic_conv"``), else ``None``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..blocks.dynamic import DY_CONV_TEMPERATURE, DynamicConv2d
from ..registry import unknown_name
from .pretrained import LAYOUTS, ReleasedWeights, load_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CFG_KEYS = (
    "input_size", "mean", "std", "num_classes", "paper", "arxiv", "paper_params_m",
    "paper_gmacs", "paper_top1", "training", "notes", "interpolation", "crop_pct", "weights",
    "layouts",
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
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
    weights: tuple[ReleasedWeights, ...] = (),
    layouts: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A complete ``default_cfg`` dict (see the module docstring for the keys)."""
    return dict(
        input_size=input_size, mean=mean, std=std, num_classes=num_classes, paper=paper,
        arxiv=arxiv, paper_params_m=paper_params_m, paper_gmacs=paper_gmacs,
        paper_top1=paper_top1, training=training, notes=notes, interpolation=interpolation,
        crop_pct=crop_pct, weights=tuple(weights), layouts=tuple(layouts),
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


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Sorted names of the registered models.

    ``pattern``: an ``fnmatch`` pattern (``"rednet*"``); ``pretrained=True``: only the models
    whose ``default_cfg["weights"]`` lists a released checkpoint that blockzoo reads (its key
    layout is in :data:`~blockzoo.models.pretrained.LAYOUTS`; SKNet's Caffe files are not).
    """
    names = sorted(_MODELS)
    if pattern is not None:
        names = fnmatch.filter(names, pattern)
    if pretrained:
        names = [n for n in names
                 if any(w.layout in LAYOUTS for w in _MODELS[n].default_cfg["weights"])]
    return names


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | ReleasedWeights = False,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name``.

    - ``pretrained``: ``False``; ``True`` (the first of ``default_cfg["weights"]``, downloaded
      into torch.hub's cache and checked against its SHA-256); a local file (blockzoo's own
      state_dict or an authors' checkpoint, ``.pth``/``.pt``/``.safetensors``); or an
      ``http(s)://`` URL; or one of ``default_cfg["weights"]``. See
      :func:`blockzoo.models.pretrained.load_pretrained`.
    - ``num_classes``: the classifier's size (default: ``default_cfg["num_classes"]``; 0: no
      classifier). A checkpoint with another number of classes loads without its classifier.
    - ``in_chans``: input channels (a pretrained first conv is adapted as timm does).
    - ``features_only=True`` builds the backbone alone: its forward returns the list of the stage
      outputs chosen by ``out_indices`` (default: all), described by ``model.feature_info``.
    - ``device``, ``dtype``: where and in which floating dtype the parameters are created.
    - ``kwargs`` override the registered configuration (e.g. ``conv="dynamic_conv"``,
      ``attention="se"``, ``global_pool="max"``, ``drop_rate=0.2``); an unknown keyword is a
      ``TypeError``.

    The model carries ``default_cfg`` (also as ``pretrained_cfg``; a dict, see this module's
    docstring) with ``num_classes`` and ``input_size`` set to what was built.
    """
    info = model_info(name)
    if not isinstance(pretrained, bool | str | os.PathLike | ReleasedWeights):
        raise TypeError(f"create_model: pretrained must be a bool, a path or a URL, got "
                        f"{pretrained!r} (num_classes and the other options are keywords)")
    if num_classes is None:
        num_classes = info.default_cfg["num_classes"]
    config = {**info.config, **kwargs}
    if out_indices is not None:
        config["out_indices"] = out_indices
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = info.builder(
            **config, num_classes=num_classes, in_chans=in_chans, features_only=features_only
        )
    if dtype is not None:
        model.to(dtype=dtype)
    cfg = dict(info.default_cfg)
    cfg["num_classes"] = getattr(model, "num_classes", 0 if features_only else num_classes)
    size = cfg["input_size"][1:]
    cfg["input_size"] = (in_chans, *size)
    if in_chans != len(cfg["mean"]):
        cfg["mean"], cfg["std"] = (0.5,) * in_chans, (0.5,) * in_chans
    cfg["architecture"] = name
    dynamic = any(isinstance(m, DynamicConv2d) for m in model.modules())
    cfg["temperature_schedule"] = DY_CONV_TEMPERATURE.as_dict() if dynamic else None
    strides = getattr(model, "feature_strides", None)
    cfg["pool_size"] = tuple(-(-s // strides[-1]) for s in size) if strides else None
    cfg["first_conv"] = next(
        (n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None
    )
    cfg["classifier"] = "fc" if isinstance(getattr(model, "fc", None), nn.Linear) else None
    cfg["min_input_size"] = (in_chans, 32, 32)
    model.default_cfg = model.pretrained_cfg = cfg
    if pretrained is not False:
        load_pretrained(model, pretrained)
    return model
