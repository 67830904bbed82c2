"""Using a trained model: :func:`load_trained`, :func:`predict` and :func:`evaluate_folder`.

A model comes from a run directory (``blockzoo train --out``: its weights, class names and the
exact preprocessing of its data) or from a registered network with ``pretrained`` weights (the
network's ``default_cfg`` gives the preprocessing; a 1000-class network gets ImageNet-1k's class
names, shipped with blockzoo).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, read_safetensors, safe_torch_load
from .config import TrainConfig
from .data import describe_bad_images, find_bad_images
from .run import (
    BEST,
    CHECKPOINT,
    CONFIG,
    WEIGHTS,
    Preprocessing,
    apply_run_cfg,
    read_run_info,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
#: Crop fraction of ImageNet evaluation (resize to ``side / 0.875``, centre-crop ``side``).
IMAGENET_CROP_PCT = 0.875


class TrainedModel(NamedTuple):
    """A model in eval mode and the transform (PIL image -> input tensor) it expects.

    Unpacks as ``model, transform = load_trained(run)``; other attributes and calls go to the
    model (``load_trained(run).default_cfg``). ``model.default_cfg["classes"]`` holds the class
    names in output order.
    """

    model: nn.Module
    transform: Preprocessing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def imagenet_classes() -> list[str]:
    """ImageNet-1k's 1000 class names in the usual index order."""
    text = resources.files("blockzoo").joinpath("resources/imagenet_classes.txt").read_text()
    return text.splitlines()


def load_trained(run: str | Path, *, checkpoint: str = "last", pretrained: str | Path | None =
                 None, device: str | torch.device = "cpu") -> TrainedModel:
    """``(model, transform)`` of a run directory, or of a registered network with weights.

    ``run`` is a ``blockzoo train`` output folder: the model is rebuilt from its ``config.json``
    with the weights of ``checkpoint``: ``"last"`` (``model.safetensors``, or ``last.pt`` for an
    unfinished run) or ``"best"`` (``best.pt``, the epoch of best validation accuracy).
    ``model.default_cfg`` then describes the data it was trained on (class names, input size,
    mean/std) and ``transform`` is exactly the preprocessing of that data.

    ``run`` may instead be a model name (``blockzoo.list_models()``) with ``pretrained``, a
    weights file (safetensors, or a ``torch.save`` state dict, loaded with ``weights_only``);
    the network's ``default_cfg`` gives the preprocessing (resize to ``side / 0.875``,
    centre crop) and a 1000-class network the ImageNet class names.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    path = Path(run)
    if path.is_dir():
        if pretrained is not None:
            raise ValueError(f"{path} is a run directory: it has its own weights; --pretrained "
                             f"is for a model name")
        model, transform = _from_run(path, checkpoint)
    else:
        model, transform = _from_pretrained(str(run), pretrained)
    return TrainedModel(model.to(device).eval(), transform)


def _from_run(run_dir: Path, checkpoint: str) -> tuple[nn.Module, Preprocessing]:
    from .build import build_model

    if checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    info = read_run_info(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a blockzoo train run?")
    config = TrainConfig(**json.loads(config_path.read_text()))
    classes = info["classes"]
    transform = Preprocessing.from_dict(info["preprocessing"])
    model = build_model(config, len(classes))
    if checkpoint == "best":
        state = load_checkpoint(run_dir / BEST)["model"]
    elif (run_dir / WEIGHTS).is_file():
        state = read_safetensors(run_dir / WEIGHTS)[0]
    elif (run_dir / CHECKPOINT).is_file():
        state = load_checkpoint(run_dir / CHECKPOINT)["model"]
    else:
        raise FileNotFoundError(f"{run_dir} holds no weights yet ({WEIGHTS} or {CHECKPOINT})")
    model.load_state_dict(state)
    apply_run_cfg(model, classes, transform)
    return model, transform


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a ``torch.save`` state dict (possibly
    under ``"state_dict"`` or ``"model"``), loaded without running pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = safe_torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (names -> tensors)")
    return state


def _from_pretrained(name: str, weights: str | Path | None) -> tuple[nn.Module, Preprocessing]:
    from ..models import create_model, list_models

    if name not in list_models():
        raise FileNotFoundError(f"{name} is neither a run directory nor a model name "
                                f"(blockzoo.list_models())")
    if weights is None:
        raise ValueError(f"{name} is a model name: give its weights with --pretrained FILE")
    # Read here first: blockzoo's own messages for refused or corrupt files, and the class count.
    state = read_state_dict(weights)
    probe = create_model(name)
    heads = [f"{k}.weight" for k, m in probe.named_modules() if isinstance(m, nn.Linear)]
    num_classes = (state[heads[-1]].shape[0] if heads and heads[-1] in state
                   else probe.default_cfg["num_classes"])
    model = create_model(name, pretrained=str(weights), num_classes=num_classes)
    cfg = model.default_cfg
    side = cfg["input_size"][-1]
    crop_pct = cfg.get("crop_pct") or IMAGENET_CROP_PCT
    transform = Preprocessing(int(round(side / crop_pct)), side, tuple(cfg["mean"]),
                              tuple(cfg["std"]), cfg.get("interpolation") or "bilinear")
    classes = (imagenet_classes() if num_classes == 1000
               else [str(i) for i in range(num_classes)])
    apply_run_cfg(model, classes, transform)
    return model, transform


def image_files(items: Iterable[str | Path]) -> list[Path]:
    """Every image file named by ``items`` (files, or folders searched recursively, sorted)."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files in {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return files


def _check_images(files: Sequence[Path]) -> None:
    bad = find_bad_images(files)
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s): {describe_bad_images(bad)}")


def _batches(files: Sequence[Path], transform: Preprocessing, batch_size: int
             ) -> Iterable[tuple[int, torch.Tensor]]:
    from PIL import Image

    for start in range(0, len(files), batch_size):
        images = []
        for f in files[start:start + batch_size]:
            with Image.open(f) as image:
                images.append(transform.resize_crop(image))
        yield start, transform.normalize(torch.stack(images))


@torch.no_grad()
def predict(trained: TrainedModel, images: Iterable[str | Path], topk: int = 5,
            batch_size: int = 32) -> list[dict[str, Any]]:
    """Top-``topk`` classes of each image: ``[{"path", "top": [(class, probability), ...]}]``.

    Images (files or folders of them) are read in batches of ``batch_size`` with the model's
    preprocessing; probabilities are the softmax of the logits.
    """
    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
    model, transform = trained
    classes = model.default_cfg["classes"]
    files = image_files(images)
    _check_images(files)
    device = next(model.parameters()).device
    results = []
    for _, batch in _batches(files, transform, batch_size):
        probs = model(batch.to(device)).float().softmax(1).cpu()
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for v, i in zip(values.tolist(), indices.tolist(), strict=True):
            results.append({"top": [(classes[c], p) for c, p in zip(i, v, strict=True)]})
    for row, path in zip(results, files, strict=True):
        row["path"] = str(path)
    return results


@torch.no_grad()
def evaluate_folder(trained: TrainedModel, folder: str | Path, batch_size: int = 32
                    ) -> dict[str, Any]:
    """Accuracy of the model on a folder with one sub-folder of images per class.

    Sub-folder names must be class names of the model. Returns ``accuracy`` (%), ``count``,
    ``per_class`` (``{class: {"correct", "count", "accuracy"}}`` for the classes present) and
    ``confusion`` (``classes x classes`` counts, rows true, columns predicted, as a tensor).
    """
    model, transform = trained
    classes = list(model.default_cfg["classes"])
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if [p.name for p in subdirs] == ["train", "val"]:
        folder, subdirs = folder / "val", sorted(p for p in (folder / "val").iterdir()
                                                 if p.is_dir())
    unknown = [p.name for p in subdirs if p.name not in classes]
    if not subdirs or unknown:
        raise ValueError(f"{folder} must hold one folder per class, named like the model's "
                         f"classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                         + (f"; unknown: {', '.join(unknown[:5])}" if unknown else ""))
    files, labels = [], []
    for sub in subdirs:
        found = image_files([sub])
        files += found
        labels += [classes.index(sub.name)] * len(found)
    _check_images(files)
    device = next(model.parameters()).device
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for start, batch in _batches(files, transform, batch_size):
        predicted = model(batch.to(device)).argmax(1).cpu()
        truth = torch.tensor(labels[start:start + len(predicted)])
        confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    counts = confusion.sum(1)
    per_class = {classes[i]: {"correct": int(confusion[i, i]), "count": int(counts[i]),
                              "accuracy": 100 * float(confusion[i, i]) / int(counts[i])}
                 for i in range(len(classes)) if counts[i]}
    return {"accuracy": 100 * float(confusion.diagonal().sum()) / len(files),
            "count": len(files), "per_class": per_class, "confusion": confusion,
            "classes": classes}


def plot_confusion(result: dict[str, Any], path: str | Path) -> Path:
    """The confusion matrix of :func:`evaluate_folder` as a PNG (row-normalised colours,
    counts written in the cells for up to 30 classes); only classes present or predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion, classes = result["confusion"], result["classes"]
    keep = ((confusion.sum(0) + confusion.sum(1)) > 0).nonzero().flatten().tolist()
    matrix = confusion[keep][:, keep].double()
    names = [classes[i] for i in keep]
    rates = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
    n = len(keep)
    side = min(4 + 0.4 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {result['accuracy']:.2f}% on {result['count']} images")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
