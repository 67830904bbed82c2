"""The training loop behind ``blockzoo train``.

One epoch: (DY-Conv temperature for the epoch) -> training pass with a per-step cosine learning
rate after a linear warm-up -> evaluation -> one row of metrics (CSV, optionally TensorBoard)
-> an atomic checkpoint (the last two kept) and, on a new best validation accuracy, ``best.pt``.
:func:`train` runs the same code in one process or in each process ``torchrun`` starts (see
:mod:`blockzoo.train.distributed`).

Faults stop the run loudly and keep the work done: a non-finite training or validation loss, or
non-finite weights, raise :class:`TrainingDiverged` naming the epoch and step, and nothing
non-finite is saved or exported (``skip_nonfinite`` skips such batches instead, counting them).
SIGINT or SIGTERM stops at the next step boundary after writing a resumable checkpoint
(:class:`TrainingInterrupted`).

Reproducibility: the model is initialised from ``seed``; the data order comes from a
``DistributedSampler`` seeded with ``seed`` (a function of ``(seed, epoch)``) and the
augmentation from ``(seed, epoch, sample index)`` (see :mod:`blockzoo.train.data`); the global
RNG states are saved with every checkpoint, and a checkpoint written mid-epoch records the
steps done. So on CPU a run resumed from any checkpoint gives bit for bit the weights of the
uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from ..core.counting import count_parameters
from ..core.interrupt import StopRequest, signal_name
from .build import (
    WarmupCosine,
    build_model,
    build_optimizer,
    seed_everything,
    temperature_schedule,
)
from .checkpoint import (
    export_safetensors,
    finite_state,
    load_newest_good,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, resolve, resume_mismatch, temperature_settings
from .data import build_data, describe_bad_images
from .distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_buffers,
    check_replicas_equal,
    cleanup_distributed,
    init_distributed,
    launched_by_torchrun,
    wrap_model,
)
from .loaders import Loaders
from .metrics import MetricsLog, Totals, check_tensorboard, epoch_line, fmt_time
from .run import (
    BEST,
    CHECKPOINT,
    CONFIG,
    METRICS,
    PREVIOUS,
    RUN_INFO,
    WEIGHTS,
    apply_run_cfg,
    run_info,
    write_json,
)

__all__ = ["CHECKPOINT", "METRICS", "WEIGHTS", "TrainConfig", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "train"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after writing the resumable ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        where = f"after step {step} of epoch {epoch}" if step else f"after epoch {epoch - 1}"
        super().__init__(f"interrupted by {signal_name(signum)} {where}; checkpoint written "
                         f"to {checkpoint}")
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weights stopped the run (the message names the epoch and step)."""


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


class _Trainer:
    """The state of one run in one process (see :func:`train`)."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        config.validate()
        self.env = env
        self.out = Path(config.out)
        self.device = env.device
        self.amp = config.amp if config.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            raise ValueError("mixed precision (--amp) is for CUDA devices only")
        if config.tensorboard:
            check_tensorboard()
        if env.is_main:
            removed = remove_stale_temporaries(self.out)
            if removed:
                self.log(f"removed {len(removed)} stale temporary file(s) left by interrupted "
                         f"writes: {', '.join(p.name for p in removed)}")
        checkpoint, self.rotate = None, True
        if config.resume:
            checkpoint = self._load_resumable()
        elif any((self.out / name).exists() for name in (CHECKPOINT, PREVIOUS)):
            raise ValueError(f"{self.out} already holds a checkpoint: pass --resume to "
                             f"continue that run, or choose another --out")
        seed_everything(config.seed)
        # Rank 0 fetches the data first (a download), the others then read what it wrote.
        if env.distributed and not env.is_main:
            torch.distributed.barrier()
        self.data = build_data(config.data, config.data_root, image_size=config.image_size,
                               download=config.download, train_size=config.train_size,
                               val_size=config.val_size, seed=config.data_seed,
                               skip_bad_images=config.skip_bad_images)
        if env.distributed and env.is_main:
            torch.distributed.barrier()
        if self.data.dropped:
            self.log(f"skipped {len(self.data.dropped)} unreadable image(s) "
                     f"(--skip-bad-images): {describe_bad_images(list(self.data.dropped))}")
        self.loaders = Loaders(self.data, config, env)
        model = build_model(config, self.data.num_classes)
        apply_run_cfg(model, self.data.classes, self.data.preprocessing)
        self.params = count_parameters(model)
        self.memory_format = (torch.channels_last if config.channels_last
                              else torch.contiguous_format)
        model.to(self.device, memory_format=self.memory_format)
        self.schedule = temperature_schedule(model, config)
        start, end, t_epochs = temperature_settings(
            config, model.default_cfg.get("temperature_schedule"))
        self.config = resolve(
            config, image_size=self.data.image_size, train_size=len(self.data.train),
            val_size=len(self.data.val), amp=self.amp, workers=self.loaders.workers,
            device=self.device.type, temperature_start=start, temperature_end=end,
            temperature_epochs=t_epochs)
        if checkpoint is not None:
            mismatch = resume_mismatch(checkpoint["config"], self.config)
            if mismatch:
                raise ValueError("--resume needs the settings of the interrupted run; these "
                                 "differ: " + "; ".join(mismatch))
        self.model = model
        self.ddp = wrap_model(model, env, config.sync_bn)
        self.optimizer = build_optimizer(self.ddp, self.config)
        steps = self.loaders.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupCosine(round(config.warmup_epochs * steps), config.epochs * steps),
        )
        self.amp_dtype = getattr(torch, config.amp_dtype)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.start_epoch, self.start_step, self.partial = 0, 0, {}
        if checkpoint is not None:
            self._restore(checkpoint)
        self.history: list[dict[str, Any]] = []

    def _load_resumable(self) -> dict[str, Any]:
        """The newest good checkpoint of ``out``: ``last.pt``, else ``previous.pt``."""
        checkpoint, path, errors = load_newest_good([self.out / CHECKPOINT, self.out / PREVIOUS])
        if errors:
            self.log(f"warning: {errors[0]}; resuming from {path} (epoch "
                     f"{checkpoint['epoch']}) instead")
            self.rotate = False  # the next save replaces the bad file and keeps this one
        return checkpoint

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Put every saved state back: weights, optimiser, schedules, position, RNGs."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = checkpoint["epoch"]
        self.start_step = checkpoint["step"]
        self.partial = checkpoint["partial"]
        if checkpoint["world_size"] != self.env.world_size:
            self.log(f"note: resuming a run of {checkpoint['world_size']} processes with "
                     f"{self.env.world_size}: the data order changes")
        set_rng_state(checkpoint["rng"])

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=sys.stderr, flush=True)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.data.preprocessing.normalize(images.to(self.device, non_blocking=True))
        return (images.contiguous(memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _flags(self, loss: torch.Tensor, stop: StopRequest) -> tuple[bool, bool]:
        """``(non-finite loss, stop requested)`` agreed by every process."""
        flags = [float(not bool(torch.isfinite(loss))), float(stop.signum is not None)]
        bad, halt = all_reduce_sum(flags, self.env)
        return bad > 0, halt > 0

    def _last_good(self) -> str:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return "no checkpoint was written before it"
        return (f"the last good checkpoint, {path}, is kept (--resume --skip-nonfinite "
                f"continues from it, skipping such batches)")

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"{what}: training stopped; {self._last_good()}. Lower --lr, "
                                f"or pass --skip-nonfinite to skip such batches")

    def checkpoint_state(self, done: int, step: int = 0,
                         partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """A resumable state: ``done`` epochs finished, then ``step`` steps of the next one."""
        return {
            "epoch": done,
            "step": step,
            "partial": partial or {},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "world_size": self.env.world_size,
            "config": self.config.to_dict(),
        }

    def _save(self, state: dict[str, Any]) -> Path:
        path = save_checkpoint(state, self.out / CHECKPOINT,
                               previous=self.out / PREVIOUS if self.rotate else None)
        self.rotate = True
        return path

    def train_epoch(self, epoch: int, stop: StopRequest,
                    eta: Callable[[int, float, float], str]) -> dict[str, Any]:
        """One training pass over epoch ``epoch`` (0-based), from ``start_step`` on resume."""
        self.ddp.train()
        first = self.start_step if epoch == self.start_epoch else 0
        partial = self.partial if first else {}
        self.loaders.set_epoch(epoch, first)
        loader = self.loaders.train
        bar = None
        if self.config.progress and self.env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.loaders.steps, initial=first, unit="batch", leave=False,
                       desc=f"epoch {epoch + 1}/{self.config.epochs}", file=sys.stderr,
                       dynamic_ncols=True, disable=None)  # None: off when not a terminal
        totals = Totals(self.device, partial.get("totals") if self.env.is_main else None)
        skipped = partial.get("skipped", 0)
        seen, start = 0, time.perf_counter()
        elapsed_before = partial.get("elapsed", 0.0)
        lr = partial.get("lr", self.optimizer.param_groups[0]["lr"])
        smoothing = self.config.label_smoothing
        try:
            for step, (images, labels) in enumerate(loader, first):
                x, y = self._inputs(images, labels)
                # A skipped batch must not leave its statistics in the BatchNorm buffers.
                buffers = ([b.clone() for b in self.model.buffers()]
                           if self.config.skip_nonfinite else [])
                with self._autocast():
                    logits = self.ddp(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
                bad, halt = self._flags(loss, stop)
                if bad and not self.config.skip_nonfinite:
                    raise self._diverged(f"non-finite training loss ({loss.item()}) at epoch "
                                         f"{epoch + 1}, step {step + 1} of {self.loaders.steps}")
                self.optimizer.zero_grad(set_to_none=True)
                if bad:
                    skipped += 1
                    with torch.no_grad():
                        for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                            buffer.copy_(saved)
                else:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    totals.add(loss.detach().double() * y.shape[0], logits, y)
                self.scheduler.step()
                seen += y.shape[0] * self.env.world_size
                if bar is not None:
                    self._progress(bar, step, totals, seen, start, epoch, eta)
                if halt:
                    state = {"totals": all_reduce_sum(totals.values(), self.env),
                             "skipped": skipped, "lr": lr,
                             "elapsed": elapsed_before + time.perf_counter() - start}
                    path = self.out / CHECKPOINT
                    if self.env.is_main:
                        path = self._save(self.checkpoint_state(epoch, step + 1, state))
                    raise TrainingInterrupted(stop.signum or signal.SIGINT, path, epoch + 1,
                                              step + 1)
        finally:
            if bar is not None:
                bar.close()
        self._sync()
        elapsed = time.perf_counter() - start
        loss, acc, count = totals.reduce(self.env)
        if count == 0:
            raise self._diverged(f"every batch of epoch {epoch + 1} had a non-finite loss")
        return {"lr": lr, "train_loss": loss, "train_acc": acc,
                "train_images_per_s": seen / max(elapsed, 1e-9),
                "epoch_time_s": elapsed_before + elapsed, "skipped_batches": skipped}

    def _progress(self, bar: Any, step: int, totals: Totals, seen: int, start: float,
                  epoch: int, eta: Callable[[int, float, float], str]) -> None:
        bar.update(1)
        if step % 10 == 0 or step == self.loaders.steps - 1:
            spent = time.perf_counter() - start
            left = (self.loaders.steps - step - 1) * self.config.batch_size * spent / seen
            bar.set_postfix({**totals.running(), "img/s": f"{seen / max(spent, 1e-9):.0f}",
                             "ETA": eta(epoch, left, spent + left)})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.model.eval()
        totals = Totals(self.device)
        for images, labels in self.loaders.val:
            x, y = self._inputs(images, labels)
            with self._autocast():
                logits = model(x).float()
            totals.add(F.cross_entropy(logits, y, reduction="sum"), logits, y)
        loss, acc, _ = totals.reduce(self.env)
        return {"val_loss": loss, "val_acc": acc}

    def _write_description(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / CONFIG, self.config.to_dict())
        write_json(self.out / RUN_INFO, run_info(self.config.model, list(self.data.classes),
                                                 self.data.preprocessing, self.config.data))

    def _metadata(self) -> dict[str, str]:
        c = self.config
        return {"model": c.model, "conv": str(c.conv), "attention": str(c.attention),
                "data": c.data, "num_classes": str(self.data.num_classes),
                "classes": json.dumps(list(self.data.classes)),
                "preprocessing": json.dumps(self.data.preprocessing.to_dict()),
                "config": json.dumps(c.to_dict())}

    def run(self, on_epoch_end: Sequence[Callable[[int, dict[str, float]], None]]
            ) -> TrainResult:
        config, env = self.config, self.env
        metrics = None
        if env.is_main:
            self._write_description()
            metrics = MetricsLog(self.out / METRICS, self.start_epoch, config.tensorboard)
            self.history = list(metrics.previous)
        best = max((r["val_acc"] for r in self.history), default=-1.0)
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
            return fmt_time(left + (config.epochs - epoch - 1) * per_epoch)

        try:
            with StopRequest() as stop:
                for epoch in range(self.start_epoch, config.epochs):
                    temperature = self.schedule.step(epoch) if self.schedule else None
                    row: dict[str, Any] = {
                        "epoch": epoch + 1,
                        "temperature": "" if temperature is None else temperature}
                    row.update(self.train_epoch(epoch, stop, eta))
                    t_eval = time.perf_counter()
                    broadcast_buffers(self.model, env)
                    row.update(self.evaluate())
                    row["epoch_time_s"] += time.perf_counter() - t_eval
                    if not torch.isfinite(torch.tensor(row["val_loss"])):
                        raise self._diverged(f"non-finite validation loss ({row['val_loss']}) "
                                             f"after epoch {epoch + 1}")
                    if not finite_state(self.model):
                        raise self._diverged(f"non-finite weights after epoch {epoch + 1}")
                    epoch_times.append(row["epoch_time_s"])
                    self.history.append(row)
                    if env.is_main:
                        metrics.write(row)
                        self._save(self.checkpoint_state(epoch + 1))
                        if row["val_acc"] > best:
                            best = row["val_acc"]
                            save_checkpoint({"epoch": epoch + 1, "val_acc": best,
                                             "model": self.model.state_dict(),
                                             "config": config.to_dict()}, self.out / BEST)
                        self.log(epoch_line(row, config.epochs, eta(epoch, 0.0, 0.0)))
                    for callback in on_epoch_end:
                        callback(epoch, row)
                    if stop.signum is not None and epoch + 1 < config.epochs:
                        raise TrainingInterrupted(stop.signum, self.out / CHECKPOINT,
                                                  epoch + 2, 0)
            check_replicas_equal(self.model, env)
            if env.is_main:
                export_safetensors(self.model, self.out / WEIGHTS, self._metadata())
        finally:
            if metrics is not None:
                metrics.close()
        return TrainResult(self.model, self.history, self.params, self.out,
                           self.data.num_classes, self.data.image_size, self.env.rank)


def train(config: TrainConfig,
          on_epoch_end: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> TrainResult:
    """Train ``config``'s model; under ``torchrun`` in every process (DDP), else in this one.

    Writes the run directory (see :mod:`blockzoo.train.run`) into ``config.out`` (rank 0
    only). ``on_epoch_end(epoch, row)`` is called in every process after each epoch's
    checkpoint (``epoch`` 0-based, ``row["epoch"]`` numbered from 1). Raises
    :class:`TrainingDiverged` on a non-finite loss and :class:`TrainingInterrupted` after
    SIGINT/SIGTERM (with a resumable checkpoint written). A run started by this call under
    ``torchrun`` leaves the process group at the end.
    """
    started_here = launched_by_torchrun() and not torch.distributed.is_initialized()
    env = init_distributed(config.device)
    try:
        return _Trainer(config, env).run(on_epoch_end)
    finally:
        if started_here:
            cleanup_distributed()
