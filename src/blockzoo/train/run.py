"""What a run directory holds, and the preprocessing that turns an image into a model input.

A run directory (``blockzoo train --out``) describes itself:

- ``config.json``: every setting, resolved (no ``null``: the learning rate, image size, workers,
  device... actually used);
- ``run.json``: the model, the class names (index order), the exact preprocessing
  (:class:`Preprocessing`) and the files below;
- ``metrics.csv``: one row per epoch, numbered from 1 as the log numbers them;
- ``last.pt`` / ``previous.pt``: the two latest checkpoints (resumable, checksummed);
- ``best.pt``: the weights of the epoch with the best validation accuracy (checksummed);
- ``model.safetensors``: the final weights, with the class names and preprocessing in its
  metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG = "config.json"
RUN_INFO = "run.json"
METRICS = "metrics.csv"
CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Preprocessing:
    """Image -> input tensor: resize the shorter side to ``resize`` (``interpolation``,
    antialiased), centre-crop ``crop`` x ``crop``, then per channel ``(x - 255 mean) / (255 std)``
    on the ``uint8`` values (``mean``/``std`` on the 0..1 scale)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("interpolation", "bilinear"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, plus ``input_size`` ``[3, crop, crop]`` for the reader."""
        return {"input_size": [len(self.mean), self.crop, self.crop], **asdict(self),
                "mean": list(self.mean), "std": list(self.std)}

    def resize_crop(self, image: Any) -> torch.Tensor:
        """A PIL image -> ``uint8`` tensor ``(3, crop, crop)`` (RGB)."""
        from torchvision.transforms import functional as TF

        mode = TF.InterpolationMode(self.interpolation)
        image = TF.resize(image.convert("RGB"), self.resize, interpolation=mode, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(image, [self.crop, self.crop]))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``(..., 3, H, W)`` -> normalised float32 (on their device)."""
        view = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(view) * 255
        std = torch.tensor(self.std, device=images.device).view(view) * 255
        return (images.float() - mean) / std

    def __call__(self, image: Any) -> torch.Tensor:
        """A PIL image -> the normalised float tensor ``(3, crop, crop)`` the model takes."""
        return self.normalize(self.resize_crop(image))


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of ``run_dir`` (``FileNotFoundError`` naming it when it is not a run)."""
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a blockzoo train run "
                                f"directory")
    return json.loads(path.read_text())


def run_info(model: str, classes: list[str], preprocessing: Preprocessing, data: str
             ) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {
        "model": model,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "data": data,
        "files": {"config": CONFIG, "metrics": METRICS, "last": CHECKPOINT,
                  "previous": PREVIOUS, "best": BEST, "weights": WEIGHTS},
    }


def apply_run_cfg(model: Any, classes: list[str] | tuple[str, ...],
                  preprocessing: Preprocessing) -> None:
    """Make ``model.default_cfg`` describe what the run trained on: ``input_size``, ``mean``,
    ``std``, ``num_classes``, ``classes`` and ``preprocessing`` (the data's, not the network
    family's defaults)."""
    cfg = dict(getattr(model, "default_cfg", None) or {})
    cfg.update(input_size=(len(preprocessing.mean), preprocessing.crop, preprocessing.crop),
               mean=tuple(preprocessing.mean), std=tuple(preprocessing.std),
               num_classes=len(classes), classes=list(classes),
               preprocessing=preprocessing.to_dict())
    model.default_cfg = cfg
    if hasattr(model, "pretrained_cfg"):  # timm's name for the same dict
        model.pretrained_cfg = cfg
