"""The training loop behind ``blockzoo train``.

One epoch: (DY-Conv temperature for the epoch) -> training pass with a per-step cosine learning
rate after a linear warm-up -> evaluation -> one row of metrics (CSV, optionally TensorBoard)
-> an atomic checkpoint. :func:`train` runs the same code in one process or in each process
``torchrun`` starts (see :mod:`blockzoo.train.distributed`).

Reproducibility: the model is initialised from ``seed``; the data order comes from a
``DistributedSampler`` seeded with ``seed`` (a function of ``(seed, epoch)``) and the
augmentation from ``(seed, epoch, sample index)`` (see :mod:`blockzoo.train.data`); the global
RNG states are saved with every checkpoint. So on CPU a run resumed from the checkpoint of epoch
``e`` gives bit for bit the weights of the uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..blocks.dynamic import DynamicConv2d, TemperatureSchedule
from ..core.counting import count_parameters
from .checkpoint import (
    export_safetensors,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import Augmented, DataBundle, build_data
from .distributed import (
    DistEnv,
    ShardSampler,
    all_reduce_sum,
    broadcast_buffers,
    check_replicas_equal,
    cleanup_distributed,
    init_distributed,
    launched_by_torchrun,
    wrap_model,
)

OPTIMIZERS = ("sgd", "adamw")
#: Default learning rate and weight decay of each optimiser.
OPTIMIZER_DEFAULTS = {"sgd": (0.1, 5e-4), "adamw": (2e-3, 0.05)}
CHECKPOINT = "last.pt"
METRICS = "metrics.csv"
WEIGHTS = "model.safetensors"
#: Settings that may differ between a run and its ``--resume``: they do not change the result.
RESUME_FREE = ("out", "resume", "workers", "progress", "tensorboard", "download", "data_root",
               "device")
METRIC_FIELDS = ("epoch", "lr", "temperature", "train_loss", "train_acc", "val_loss", "val_acc",
                 "train_images_per_s", "epoch_time_s")


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``blockzoo train`` options, with the same names).

    ``conv`` and ``attention`` are block names passed to the model (``None``: plain 3x3
    convolutions, no attention). ``lr`` and ``weight_decay`` default per optimiser
    (:data:`OPTIMIZER_DEFAULTS`); weight decay is not applied to biases and normalisation
    weights (1-D parameters). ``batch_size`` is the global batch, split evenly over the
    processes. ``warmup_epochs`` of linear warm-up (from ``lr / warmup_steps``) precede the
    cosine decay to 0, both stepped every iteration. ``amp=None`` means mixed precision on CUDA,
    never on CPU (``amp=True`` on CPU is an error); ``amp_dtype`` ``"float16"`` adds a gradient
    scaler. The DY-Conv temperature goes linearly from ``temperature_start`` to
    ``temperature_end`` over ``temperature_epochs`` epochs (default ``min(10, epochs - 1)``, at
    least 1: the paper's 10 epochs, ending before the last epoch of a short run) whenever the
    model holds a :class:`~blockzoo.blocks.dynamic.DynamicConv2d`.
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
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    temperature_epochs: int | None = None
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.amp_dtype in ("bfloat16", "float16"),
             f"amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}"),
            (self.temperature_epochs is None or self.temperature_epochs >= 1,
             f"temperature_epochs must be >= 1, got {self.temperature_epochs}"),
            (self.workers is None or self.workers >= 0,
             f"workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain dict (what ``config.json`` and checkpoints store)."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process)."""

    model: nn.Module
    #: One row per epoch (``metrics.csv``'s); on rank 0 it includes the epochs trained before a
    #: ``--resume``, on other ranks only the epochs of this call.
    history: list[dict[str, Any]]
    params: int
    out: Path
    num_classes: int
    image_size: int
    #: This process's rank (0 without torchrun).
    rank: int = 0

    @property
    def val_acc(self) -> float:
        """Validation accuracy (%) after the last epoch."""
        return self.history[-1]["val_acc"]

    @property
    def best_val_acc(self) -> float:
        """The highest validation accuracy (%) of any epoch."""
        return max(row["val_acc"] for row in self.history)

    @property
    def train_images_per_s(self) -> float:
        """Mean training throughput over the epochs of this run (all processes together)."""
        return sum(r["train_images_per_s"] for r in self.history) / len(self.history)


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


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``blockzoo.models.create_model`` with the run's model, conv, attention and options."""
    from ..models import create_model

    # conv/attention go to the model only when asked for, so that a named configuration
    # (mobilenetv2_ca, rednet50, ...) keeps its own.
    swaps = {k: v for k, v in (("conv", config.conv), ("attention", config.attention)) if v}
    return create_model(config.model, num_classes=num_classes, in_chans=3, **swaps,
                        **config.model_kwargs)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW, without weight decay on 1-D parameters."""
    lr, wd = OPTIMIZER_DEFAULTS[config.optimizer]
    lr = config.lr if config.lr is not None else lr
    wd = config.weight_decay if config.weight_decay is not None else wd
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def temperature_schedule(model: nn.Module, config: TrainConfig) -> TemperatureSchedule | None:
    """DY-Conv's temperature annealing when ``model`` holds a dynamic convolution, else None."""
    if not any(isinstance(m, DynamicConv2d) for m in model.modules()):
        return None
    epochs = config.temperature_epochs or max(1, min(10, config.epochs - 1))
    return TemperatureSchedule(model, config.temperature_start, config.temperature_end, epochs)


class _Loaders:
    """Training and validation loaders of one process, with the training set's per-epoch seed."""

    def __init__(self, data: DataBundle, config: TrainConfig, env: DistEnv) -> None:
        if config.batch_size % env.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{env.world_size} processes")
        batch = config.batch_size // env.world_size
        self.train_set = (Augmented(data.train, max(1, data.image_size // 8), config.seed)
                          if config.augment else data.train)
        self.sampler = DistributedSampler(self.train_set, env.world_size, env.rank,
                                          shuffle=True, seed=config.seed)
        workers = config.workers
        if workers is None:
            workers = 4 if data.name == "imagefolder" else 0
        pin = env.device.type == "cuda"
        self.train = DataLoader(self.train_set, batch_size=batch, sampler=self.sampler,
                                num_workers=workers, pin_memory=pin,
                                drop_last=len(self.sampler) >= batch)
        self.val = DataLoader(data.val, batch_size=batch,
                              sampler=ShardSampler(len(data.val), env.rank, env.world_size),
                              num_workers=workers, pin_memory=pin)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        if isinstance(self.train_set, Augmented):
            self.train_set.set_epoch(epoch)


class _MetricsLog:
    """``metrics.csv`` (one row per epoch) and, optionally, TensorBoard scalars; rank 0 only."""

    def __init__(self, out: Path, start_epoch: int, tensorboard: bool) -> None:
        self.path = out / METRICS
        #: The rows of the epochs before ``start_epoch`` (a resumed run's), as numbers.
        self.previous = [r for r in read_metrics(self.path) if r["epoch"] < start_epoch]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(self.previous)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and value != "":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv`` (epoch as int, the rest as float; "" where empty)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k == "epoch" else (float(v) if v != "" else "")
                 for k, v in row.items()} for row in csv.DictReader(f)]


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ValueError("--tensorboard needs the tensorboard package: pip install "
                         "tensorboard") from err


def _resume_mismatch(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    now = config.to_dict()
    return [f"{k} (checkpoint {saved.get(k)!r}, now {v!r})" for k, v in now.items()
            if k not in RESUME_FREE and saved.get(k) != v]


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Trainer:
    """The state of one run in one process (see :func:`train`)."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        config.validate()
        self.config, self.env = config, env
        self.out = Path(config.out)
        self.device = env.device
        self.amp = config.amp if config.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            raise ValueError("mixed precision (--amp) is for CUDA devices only")
        if config.tensorboard:
            _check_tensorboard()
        checkpoint = None
        if config.resume:
            checkpoint = load_checkpoint(self.out / CHECKPOINT)
            mismatch = _resume_mismatch(checkpoint["config"], config)
            if mismatch:
                raise ValueError("--resume needs the settings of the interrupted run; these "
                                 "differ: " + "; ".join(mismatch))
        elif (self.out / CHECKPOINT).exists():
            raise ValueError(f"{self.out} already holds a checkpoint: pass --resume to "
                             f"continue that run, or choose another --out")
        seed_everything(config.seed)
        # Rank 0 fetches the data first (a download), the others then read what it wrote.
        if env.distributed and not env.is_main:
            torch.distributed.barrier()
        self.data = build_data(config.data, config.data_root, image_size=config.image_size,
                               download=config.download, train_size=config.train_size,
                               val_size=config.val_size, seed=config.data_seed)
        if env.distributed and env.is_main:
            torch.distributed.barrier()
        self.loaders = _Loaders(self.data, config, env)
        model = build_model(config, self.data.num_classes)
        self.params = count_parameters(model)
        self.memory_format = (torch.channels_last if config.channels_last
                              else torch.contiguous_format)
        model.to(self.device, memory_format=self.memory_format)
        self.schedule = temperature_schedule(model, config)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        self.model = model
        self.ddp = wrap_model(model, env, config.sync_bn)
        self.optimizer = build_optimizer(self.ddp, config)
        steps = len(self.loaders.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupCosine(round(config.warmup_epochs * steps), config.epochs * steps),
        )
        self.amp_dtype = getattr(torch, config.amp_dtype)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.start_epoch = 0
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            self.start_epoch = checkpoint["epoch"]
            if checkpoint["world_size"] != env.world_size:
                self.log(f"note: resuming a run of {checkpoint['world_size']} processes with "
                         f"{env.world_size}: the data order changes")
            set_rng_state(checkpoint["rng"])
        view = (1, 3, 1, 1)
        self.mean = torch.tensor(self.data.mean, device=self.device).view(view) * 255
        self.std = torch.tensor(self.data.std, device=self.device).view(view) * 255
        self.history: list[dict[str, float]] = []

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=sys.stderr, flush=True)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).float()
        images = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int, eta: Callable[[int, float, float], str]
                    ) -> dict[str, float]:
        self.ddp.train()
        loader = self.loaders.train
        bar = None
        if self.config.progress and self.env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.config.epochs}",
                       unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True,
                       disable=None)  # None: off when stderr is not a terminal
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, n
        seen, start = 0, time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            x, y = self._inputs(images, labels)
            with self._autocast():
                logits = self.ddp(x)
                loss = F.cross_entropy(logits.float(), y,
                                       label_smoothing=self.config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            n = y.shape[0]
            totals += torch.stack([loss.detach().double() * n,
                                   (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(float(n), dtype=torch.float64,
                                                device=self.device)])
            seen += n * self.env.world_size
            if bar is not None:
                rate = seen / max(time.perf_counter() - start, 1e-9)
                if step % 10 == 0 or step == len(loader) - 1:
                    loss_sum, correct, count = totals.tolist()
                    left = (len(loader) - step - 1) * n * self.env.world_size / rate
                    bar.set_postfix({
                        "loss": f"{loss_sum / count:.3f}", "acc": f"{100 * correct / count:.1f}%",
                        "img/s": f"{rate:.0f}",
                        "ETA": eta(epoch, left, time.perf_counter() - start + left),
                    })
                bar.update(1)
        self._sync()
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.close()
        loss_sum, correct, count = all_reduce_sum(totals.tolist(), self.env)
        return {"train_loss": loss_sum / count, "train_acc": 100 * correct / count,
                "train_images_per_s": seen / elapsed}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for images, labels in self.loaders.val:
            x, y = self._inputs(images, labels)
            with self._autocast():
                logits = model(x).float()
            totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                   (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                                device=self.device)])
        loss_sum, correct, count = all_reduce_sum(totals.tolist(), self.env)
        return {"val_loss": loss_sum / count, "val_acc": 100 * correct / count}

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": {"sampler_seed": self.config.seed, "next_epoch": epoch + 1,
                     "augment_seed": self.config.seed},
            "world_size": self.env.world_size,
            "config": self.config.to_dict(),
        }

    def run(self, on_epoch_end: Sequence[Callable[[int, dict[str, float]], None]]
            ) -> TrainResult:
        config, env = self.config, self.env
        metrics = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            metrics = _MetricsLog(self.out, self.start_epoch, config.tensorboard)
            self.history = list(metrics.previous)
        where = f"{env.world_size} processes" if env.distributed else "1 process"
        self.log(f"training {config.model} (conv={config.conv}, attention={config.attention}, "
                 f"{self.params:,} parameters) on {config.data} "
                 f"({len(self.data.train)} train / {len(self.data.val)} val images, "
                 f"{self.data.image_size}px) for {config.epochs} epochs, {where} on "
                 f"{self.device}, amp={self.amp}")
        epoch_times: list[float] = []

        def eta(epoch: int, left: float, epoch_estimate: float) -> str:
            """Time left in the run: ``left`` of epoch ``epoch``, then the later epochs."""
            per_epoch = sum(epoch_times) / len(epoch_times) if epoch_times else epoch_estimate
            return _fmt_time(left + (config.epochs - epoch - 1) * per_epoch)

        try:
            for epoch in range(self.start_epoch, config.epochs):
                t0 = time.perf_counter()
                temperature = self.schedule.step(epoch) if self.schedule else None
                self.loaders.set_epoch(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                row: dict[str, Any] = {"epoch": epoch, "lr": lr,
                                       "temperature": "" if temperature is None else temperature}
                row.update(self.train_epoch(epoch, eta))
                broadcast_buffers(self.model, env)
                row.update(self.evaluate())
                row["epoch_time_s"] = time.perf_counter() - t0
                epoch_times.append(row["epoch_time_s"])
                self.history.append(row)
                if env.is_main:
                    metrics.write(row)
                    save_checkpoint(self.checkpoint_state(epoch), self.out / CHECKPOINT)
                    temp = "" if temperature is None else f" | T {temperature:.2f}"
                    self.log(f"epoch {epoch + 1}/{config.epochs} | train loss "
                             f"{row['train_loss']:.3f} acc {row['train_acc']:.1f}% | val loss "
                             f"{row['val_loss']:.3f} acc {row['val_acc']:.1f}% | "
                             f"{row['train_images_per_s']:.0f} img/s | lr {lr:.4g}{temp} | "
                             f"ETA {eta(epoch, 0.0, 0.0)}")
                for callback in on_epoch_end:
                    callback(epoch, row)
            check_replicas_equal(self.model, env)
            if env.is_main:
                meta = {k: str(v) for k, v in config.to_dict().items()
                        if k in ("model", "conv", "attention", "data")}
                meta["num_classes"] = str(self.data.num_classes)
                export_safetensors(self.model, self.out / WEIGHTS, meta)
        finally:
            if metrics is not None:
                metrics.close()
        return TrainResult(self.model, self.history, self.params, self.out,
                           self.data.num_classes, self.data.image_size, self.env.rank)


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model a finished run in ``run_dir`` trained: built from its ``config.json`` with the
    weights of its ``model.safetensors``, in eval mode."""
    from .checkpoint import load_safetensors

    run_dir = Path(run_dir)
    for name in ("config.json", WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished run?")
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    from safetensors import safe_open

    with safe_open(str(run_dir / WEIGHTS), "pt") as f:
        num_classes = int(f.metadata()["num_classes"])
    model = build_model(config, num_classes)
    return load_safetensors(model, run_dir / WEIGHTS).to(device).eval()


def train(config: TrainConfig,
          on_epoch_end: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> TrainResult:
    """Train ``config``'s model; under ``torchrun`` in every process (DDP), else in this one.

    Writes ``config.json``, ``metrics.csv``, ``last.pt`` (every epoch) and, at the end,
    ``model.safetensors`` into ``config.out`` (rank 0 only). ``on_epoch_end(epoch, row)`` is
    called in every process after each epoch's checkpoint. A run started by this call under
    ``torchrun`` leaves the process group at the end.
    """
    started_here = launched_by_torchrun() and not torch.distributed.is_initialized()
    env = init_distributed(config.device)
    try:
        return _Trainer(config, env).run(on_epoch_end)
    finally:
        if started_here:
            cleanup_distributed()
