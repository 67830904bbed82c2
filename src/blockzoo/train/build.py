"""What a run is built from: the model, the optimiser, the learning-rate and temperature
schedules, and the seeds."""

from __future__ import annotations

import inspect
import math
import random

import numpy as np
import torch
from torch import nn

from ..blocks.dynamic import DynamicConv2d, TemperatureSchedule
from ..core.validation import close_matches
from .config import TrainConfig, block_or_none, default_lr_and_weight_decay, temperature_settings


class WarmupCosine:
    """Learning-rate factor of step ``t``: linear warm-up over ``warmup`` steps, then cosine.

    ``(t + 1) / warmup`` for ``t < warmup``, then ``0.5 * (1 + cos(pi * (t - warmup) / (total -
    warmup)))``, reaching 0 after ``total`` steps. A plain object (not a closure), so
    ``LambdaLR.state_dict`` stores its two integers.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup, span) / span))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_model_kwargs(name: str, kwargs: dict) -> None:
    """``ValueError`` naming the options ``name``'s builder does not take."""
    from ..models import model_info

    params = inspect.signature(model_info(name).builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            raise ValueError(f"model {name!r} has no option {key!r} (--model-kwargs)"
                             f"{close_matches(key, params)}")


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``blockzoo.models.create_model`` with the run's model, conv, attention and options.

    An option the model does not take, or a value it cannot use, is a one-line ``ValueError``.
    """
    from ..models import create_model

    # conv/attention go to the model only when asked for, so that a named configuration
    # (mobilenetv2_ca, rednet50, ...) keeps its own.
    swaps = {k: v for k, v in (("conv", block_or_none(config.conv)),
                               ("attention", block_or_none(config.attention))) if v}
    _check_model_kwargs(config.model, config.model_kwargs)
    try:
        return create_model(config.model, num_classes=num_classes, in_chans=3, **swaps,
                            **config.model_kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build model {config.model!r} with "
                         f"{config.model_kwargs or 'its defaults'}: {err}") from err


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW, without weight decay on 1-D parameters."""
    lr, wd = default_lr_and_weight_decay(config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def temperature_schedule(model: nn.Module, config: TrainConfig) -> TemperatureSchedule | None:
    """DY-Conv's temperature annealing when ``model`` holds a dynamic convolution, else None.

    The schedule is the model's ``default_cfg["temperature_schedule"]`` with ``config``'s
    overrides (:func:`~blockzoo.train.config.temperature_settings`).
    """
    if not any(isinstance(m, DynamicConv2d) for m in model.modules()):
        return None
    cfg = getattr(model, "default_cfg", None) or {}
    return TemperatureSchedule(model, *temperature_settings(config,
                                                            cfg.get("temperature_schedule")))
