"""Per-epoch numbers: running totals on the device, ``metrics.csv`` and TensorBoard.

Epochs are numbered from 1 everywhere (``metrics.csv``, TensorBoard, the log's
``epoch 3/30`` lines and a checkpoint's ``epoch``, the number of epochs it holds).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from .distributed import DistEnv, all_reduce_sum

METRIC_FIELDS = ("epoch", "lr", "temperature", "train_loss", "train_acc", "val_loss", "val_acc",
                 "train_images_per_s", "epoch_time_s", "skipped_batches")


class Totals:
    """Summed loss, correct predictions and sample count, kept on the device (no sync per step).

    ``add(loss_sum, logits, labels)`` adds one batch (``loss_sum``: the batch's summed loss);
    :meth:`reduce` sums over the processes and returns ``(mean loss, accuracy in %)``.
    """

    def __init__(self, device: torch.device, values: list[float] | None = None) -> None:
        self.sums = torch.tensor(values or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        correct = (logits.argmax(1) == labels).sum()
        count = torch.full((), labels.shape[0], device=labels.device)
        self.sums += torch.stack([loss_sum.detach(), correct, count]).double()

    def running(self) -> dict[str, str]:
        """This process's mean loss and accuracy so far, formatted for a progress bar."""
        loss_sum, correct, count = self.values()
        return {"loss": f"{loss_sum / max(count, 1):.3f}",
                "acc": f"{100 * correct / max(count, 1):.1f}%"}

    def values(self) -> list[float]:
        """``[loss sum, correct, count]`` of this process (what a checkpoint stores mid-epoch)."""
        return self.sums.tolist()

    def reduce(self, env: DistEnv) -> tuple[float, float, float]:
        """``(mean loss, accuracy %, count)`` over every process (NaN for an empty count)."""
        loss_sum, correct, count = all_reduce_sum(self.values(), env)
        if count == 0:
            return float("nan"), float("nan"), 0.0
        return loss_sum / count, 100 * correct / count, count


class MetricsLog:
    """``metrics.csv`` (one row per epoch) and, optionally, TensorBoard scalars; rank 0 only.

    Opening it keeps the rows of the epochs a resumed checkpoint holds (``epoch <= done``).
    """

    def __init__(self, path: Path, done: int, tensorboard: bool) -> None:
        self.path = path
        #: The rows of the epochs before this call (a resumed run's), as numbers.
        self.previous = [r for r in read_metrics(path) if r["epoch"] <= done]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(self.previous)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"), purge_step=done + 1)

    def write(self, row: dict[str, Any]) -> None:
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

    def parse(key: str, value: str | None) -> Any:
        if value in ("", None):
            return ""
        return int(value) if key in ("epoch", "skipped_batches") else float(value)

    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def fmt_time(seconds: float) -> str:
    """``"1h02m03s"`` / ``"2m03s"``."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def epoch_line(row: dict[str, Any], epochs: int, eta: str) -> str:
    """The log line of one epoch's ``row``."""
    temp = "" if row["temperature"] == "" else f" | T {row['temperature']:.2f}"
    skipped = (f" | skipped {row['skipped_batches']} non-finite batches"
               if row["skipped_batches"] else "")
    return (f"epoch {row['epoch']}/{epochs} | train loss {row['train_loss']:.3f} acc "
            f"{row['train_acc']:.1f}% | val loss {row['val_loss']:.3f} acc "
            f"{row['val_acc']:.1f}% | {row['train_images_per_s']:.0f} img/s | lr "
            f"{row['lr']:.4g}{temp}{skipped} | ETA {eta}")


def check_tensorboard() -> None:
    """``ValueError`` with the install command when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ValueError("--tensorboard needs the tensorboard package: pip install "
                         "tensorboard") from err
