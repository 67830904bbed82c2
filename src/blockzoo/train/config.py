"""The settings of a training run: :class:`TrainConfig`, its defaults, its checks, what
``--resume`` may change, and the resolved form ``config.json`` stores (every default filled in).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..blocks.dynamic import DY_CONV_TEMPERATURE

OPTIMIZERS = ("sgd", "adamw")
#: Default learning rate and weight decay of each optimiser.
OPTIMIZER_DEFAULTS = {"sgd": (0.1, 5e-4), "adamw": (2e-3, 0.05)}
#: ``conv`` / ``attention`` value meaning "none" (plain 3x3 convolutions, no attention).
NONE = "none"
#: Settings that may differ between a run and its ``--resume``: they do not change the result
#: (``skip_nonfinite`` only matters once a loss is non-finite, which stops a run without it).
RESUME_FREE = ("out", "resume", "workers", "progress", "tensorboard", "download", "data_root",
               "device", "skip_nonfinite")


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``blockzoo train`` options, with the same names).

    ``conv`` and ``attention`` are block names passed to the model (``None`` or ``"none"``: plain
    3x3 convolutions, no attention). ``lr`` and ``weight_decay`` default per optimiser
    (:data:`OPTIMIZER_DEFAULTS`); weight decay is not applied to biases and normalisation
    weights (1-D parameters). ``batch_size`` is the global batch, split evenly over the
    processes. ``warmup_epochs`` of linear warm-up (from ``lr / warmup_steps``) precede the
    cosine decay to 0, both stepped every iteration. ``amp=None`` means mixed precision on CUDA,
    never on CPU (``amp=True`` on CPU is an error); ``amp_dtype`` ``"float16"`` adds a gradient
    scaler. When the model holds a :class:`~blockzoo.blocks.dynamic.DynamicConv2d` its
    temperature follows the model's ``default_cfg["temperature_schedule"]`` (DY-Conv's
    :data:`~blockzoo.blocks.dynamic.DY_CONV_TEMPERATURE`); ``temperature_start`` /
    ``temperature_end`` / ``temperature_epochs`` override it. The schedule's length is capped at
    ``epochs - 1`` (at least 1) so that a short run still ends at the final temperature.

    ``skip_nonfinite`` skips (and counts) the batches whose loss is not finite instead of
    stopping the run; ``skip_bad_images`` drops unreadable ImageFolder images instead of
    refusing to start. ``None`` means "the default"; :func:`resolve` fills every one in.
    """

    model: str = "resnet_cifar"
    conv: str | None = None
    attention: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    data_root: str = "data"
    download: bool = True
    image_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    data_seed: int = 0
    augment: bool = True
    skip_bad_images: bool = False
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    amp: bool | None = None
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    sync_bn: bool = True
    temperature_start: float | None = None
    temperature_end: float | None = None
    temperature_epochs: int | None = None
    skip_nonfinite: bool = False
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work (0 is a value, never "unset")."""

        def positive_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        def non_negative(v: object) -> bool:
            return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0

        def optional(ok: bool, v: object) -> bool:
            return v is None or ok

        checks = [
            (positive_int(self.epochs), f"epochs must be >= 1, got {self.epochs}"),
            (positive_int(self.batch_size), f"batch_size must be >= 1, got {self.batch_size}"),
            (optional(positive_int(self.image_size), self.image_size),
             f"image_size must be >= 1, got {self.image_size}"),
            (optional(positive_int(self.train_size), self.train_size),
             f"train_size must be >= 1, got {self.train_size}"),
            (optional(positive_int(self.val_size), self.val_size),
             f"val_size must be >= 1, got {self.val_size}"),
            (self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (optional(non_negative(self.lr) and self.lr > 0, self.lr),
             f"lr must be a positive finite number, got {self.lr}"),
            (non_negative(self.momentum), f"momentum must be >= 0, got {self.momentum}"),
            (optional(non_negative(self.weight_decay), self.weight_decay),
             f"weight_decay must be >= 0, got {self.weight_decay}"),
            (non_negative(self.warmup_epochs),
             f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (non_negative(self.label_smoothing) and self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.amp_dtype in ("bfloat16", "float16"),
             f"amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}"),
            (optional(non_negative(self.temperature_start) and self.temperature_start > 0,
                      self.temperature_start),
             f"temperature_start must be positive, got {self.temperature_start}"),
            (optional(non_negative(self.temperature_end) and self.temperature_end > 0,
                      self.temperature_end),
             f"temperature_end must be positive, got {self.temperature_end}"),
            (optional(positive_int(self.temperature_epochs), self.temperature_epochs),
             f"temperature_epochs must be >= 1, got {self.temperature_epochs}"),
            (isinstance(self.seed, int) and self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (isinstance(self.data_seed, int) and self.data_seed >= 0,
             f"data_seed must be >= 0, got {self.data_seed}"),
            (optional(isinstance(self.workers, int) and self.workers >= 0, self.workers),
             f"workers must be >= 0, got {self.workers}"),
            (self.device in ("auto", "cpu", "cuda"),
             f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain dict (what ``config.json`` and checkpoints store)."""
        return dataclasses.asdict(self)


def block_or_none(name: str | None) -> str | None:
    """``name``, or ``None`` for ``None`` / ``"none"``."""
    return None if name in (None, NONE) else name


def default_lr_and_weight_decay(config: TrainConfig) -> tuple[float, float]:
    """``(lr, weight_decay)``: the configured values, else the optimiser's defaults."""
    lr, wd = OPTIMIZER_DEFAULTS[config.optimizer]
    return (config.lr if config.lr is not None else lr,
            config.weight_decay if config.weight_decay is not None else wd)


def temperature_settings(config: TrainConfig, model_schedule: dict[str, Any] | None
                         ) -> tuple[float, float, int]:
    """``(start, end, epochs)`` of the DY-Conv annealing: ``config``'s where set, else the
    model's ``default_cfg["temperature_schedule"]`` (else :data:`DY_CONV_TEMPERATURE`); the
    default length is capped at ``epochs - 1`` (at least 1)."""
    schedule = model_schedule or DY_CONV_TEMPERATURE.as_dict()
    start = config.temperature_start if config.temperature_start is not None else schedule["start"]
    end = config.temperature_end if config.temperature_end is not None else schedule["end"]
    epochs = config.temperature_epochs
    if epochs is None:
        epochs = max(1, min(schedule["epochs"], config.epochs - 1))
    return float(start), float(end), int(epochs)


def resolve(config: TrainConfig, **resolved: Any) -> TrainConfig:
    """``config`` with every default filled in: ``resolved`` (the values only known once the data
    and the device are, e.g. ``image_size``, ``workers``, ``device``) plus the rules here."""
    lr, wd = default_lr_and_weight_decay(config)
    values = dict(conv=config.conv or NONE, attention=config.attention or NONE, lr=lr,
                  weight_decay=wd)
    values.update(resolved)
    out = dataclasses.replace(config, **values)
    missing = [k for k, v in out.to_dict().items() if v is None]
    if missing:
        raise RuntimeError(f"resolve: no value for {', '.join(missing)}")
    return out


def resume_mismatch(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings (other than :data:`RESUME_FREE`) where ``config`` differs from ``saved``."""
    now = config.to_dict()
    return [f"{k} (checkpoint {saved.get(k)!r}, now {v!r})" for k, v in now.items()
            if k not in RESUME_FREE and saved.get(k) != v]
