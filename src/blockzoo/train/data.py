"""Datasets for ``blockzoo train``: CIFAR-10/100, any ImageFolder directory, and ``synthetic``.

Every dataset yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``(3, H, W)``; the
training loop moves the batch to the device, converts it to float and normalises it there with
the dataset's ``mean`` and ``std`` (a quarter of the bytes of float images cross to the GPU).
Each bundle states its :class:`~blockzoo.train.run.Preprocessing` (size, resize and crop,
mean/std): what a trained model expects at prediction time.

ImageFolder images are checked before training (:func:`find_bad_images`: empty, unreadable or
truncated files), so that a damaged file is reported with its path rather than failing a worker
mid-epoch or disappearing unseen into a dropped last batch.

Training augmentation (random crop from a zero-padded image, random horizontal flip) draws its
randomness from a generator seeded by ``(seed, epoch, sample index)``, never from a global RNG:
a sample's augmentation is the same whatever the number of loader workers, processes or
restarts, which is what lets ``--resume`` continue bit for bit.

``synthetic`` is generated, deterministic and learnable: ten classes, five shapes (disc,
square, triangle, ring, plus sign) and five textures (horizontal, vertical and diagonal
stripes, checkerboard, dot lattice), each drawn at a random position and scale (a quarter to
nearly the whole image) with random foreground and background colours and pixel noise, so
only the form identifies the class. The same ``seed`` and sizes give the same images on every
machine (NumPy's PCG64 generator).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .run import Preprocessing

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")

#: Per-channel mean and standard deviation of each dataset's training images (0..1 scale).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SYNTHETIC_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

SYNTHETIC_CLASSES = (
    "disc", "square", "triangle", "ring", "plus",
    "h_stripes", "v_stripes", "diag_stripes", "checkerboard", "dots",
)


@dataclass
class DataBundle:
    """A training set, a validation set and what the model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset
    #: Class names in label order.
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    #: ``(path, reason)`` of the unreadable images left out (``skip_bad_images``).
    dropped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.preprocessing.crop

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std


def default_workers(name: str) -> int:
    """Data-loader workers by default: 0 for in-memory data, else 4 but never more than the
    CPU cores this process may use."""
    if name != "imagefolder":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ImageTensorDataset(Dataset):
    """Images held in memory as one ``uint8`` tensor ``(N, 3, H, W)`` with ``int64`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class Augmented(Dataset):
    """Random crop (zero padding ``pad`` on every side) and horizontal flip of ``uint8`` images.

    The randomness of sample ``i`` in epoch ``e`` comes from ``random.Random`` seeded with
    ``(seed, e, i)`` only; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, base: Dataset, pad: int, seed: int) -> None:
        if pad < 0:
            raise ValueError(f"pad must be non-negative, got {pad}")
        self.base = base
        self.pad = pad
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        if self.pad:
            _, h, w = image.shape
            top, left = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
            padded = image.new_zeros((image.shape[0], h + 2 * self.pad, w + 2 * self.pad))
            padded[:, self.pad:self.pad + h, self.pad:self.pad + w] = image
            image = padded[:, top:top + h, left:left + w]
        if rng.random() < 0.5:
            image = image.flip(-1)
        return image.contiguous(), label


# --------------------------------------------------------------------------- synthetic data


def _shape_masks(kind: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean masks of shape class ``kind`` for offsets ``dx, dy`` from centres, radius ``r``."""
    d = np.hypot(dx, dy)
    if kind == 0:  # disc
        return d < r
    if kind == 1:  # square (axis-aligned, same area as the disc)
        return np.maximum(np.abs(dx), np.abs(dy)) < 0.886 * r
    if kind == 2:  # upward triangle
        return (dy < 0.5 * r) & (dy > -r + 1.732 * np.abs(dx))
    if kind == 3:  # ring
        return np.abs(d - 0.7 * r) < 0.3 * r
    # plus sign
    arm = 0.3 * r
    return ((np.abs(dx) < arm) & (np.abs(dy) < r)) | ((np.abs(dy) < arm) & (np.abs(dx) < r))


def _texture_masks(kind: int, x: np.ndarray, y: np.ndarray, period: np.ndarray,
                   phase: np.ndarray) -> np.ndarray:
    """Boolean masks of texture class ``kind`` (5..9) with the given period and phase."""
    w = 2 * math.pi / period
    if kind == 5:  # horizontal stripes
        return np.sin(w * y + phase) > 0
    if kind == 6:  # vertical stripes
        return np.sin(w * x + phase) > 0
    if kind == 7:  # diagonal stripes
        return np.sin(w * (x + y) / math.sqrt(2) + phase) > 0
    if kind == 8:  # checkerboard
        return np.sin(w * x + phase) * np.sin(w * y + phase) > 0
    # dot lattice
    u = np.mod(x + phase / w, period) - period / 2
    v = np.mod(y + phase / w, period) - period / 2
    return np.hypot(u, v) < period / 3


def make_synthetic(n: int, image_size: int = 32, seed: int = 0) -> ImageTensorDataset:
    """``n`` generated images ``(3, S, S)`` of the ten :data:`SYNTHETIC_CLASSES`, balanced.

    Shapes have a random centre and radius (0.15 to 0.45 of the side); textures fill a random
    square patch (half-side 0.25 to 0.5 of the side) with a random period (3 to 8 pixels scaled
    by ``S / 32``) and phase. Foreground and background colours are random and at least 0.35
    apart (Euclidean, RGB in 0..1); Gaussian noise of standard deviation 0.04 is added.
    """
    if n < 1 or image_size < 8:
        raise ValueError(f"synthetic data needs n >= 1 and image_size >= 8, got n={n}, "
                         f"image_size={image_size}")
    rng = np.random.default_rng([seed, n, image_size])
    s = image_size
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES))
    coords = np.arange(s, dtype=np.float64) + 0.5
    y, x = np.meshgrid(coords, coords, indexing="ij")
    masks = np.zeros((n, s, s), dtype=bool)
    for kind in range(len(SYNTHETIC_CLASSES)):
        idx = np.flatnonzero(labels == kind)
        m = len(idx)
        if kind < 5:
            r = rng.uniform(0.15, 0.45, (m, 1, 1)) * s
            cx = rng.uniform(r[:, 0, 0], s - r[:, 0, 0])[:, None, None]
            cy = rng.uniform(r[:, 0, 0], s - r[:, 0, 0])[:, None, None]
            masks[idx] = _shape_masks(kind, x - cx, y - cy, r)
        else:
            half = rng.uniform(0.25, 0.5, (m, 1, 1)) * s
            cx = rng.uniform(half[:, 0, 0], s - half[:, 0, 0])[:, None, None]
            cy = rng.uniform(half[:, 0, 0], s - half[:, 0, 0])[:, None, None]
            period = rng.uniform(3.0, 8.0, (m, 1, 1)) * s / 32
            phase = rng.uniform(0, 2 * math.pi, (m, 1, 1))
            inside = (np.abs(x - cx) < half) & (np.abs(y - cy) < half)
            masks[idx] = inside & _texture_masks(kind, x, y, period, phase)
    background = rng.uniform(0, 1, (n, 3))
    foreground = rng.uniform(0, 1, (n, 3))
    for _ in range(100):  # redraw foregrounds too close to their background
        close = np.linalg.norm(foreground - background, axis=1) < 0.35
        if not close.any():
            break
        foreground[close] = rng.uniform(0, 1, (int(close.sum()), 3))
    images = np.where(masks[:, None], foreground[:, :, None, None],
                      background[:, :, None, None])
    images = images + rng.normal(0, 0.04, images.shape)
    images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    return ImageTensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


# --------------------------------------------------------------------------- file datasets


def _missing(what: str, path: Path, download: bool, reason: str = "") -> FileNotFoundError:
    how = (f"the download failed ({reason})" if download
           else "downloading is disabled (--no-download)")
    return FileNotFoundError(
        f"{what} not found at {path}: {how}. Put the dataset there, or pass --data-root "
        f"pointing at the folder that holds it"
    )


def _cifar(name: str, root: Path, download: bool) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    from torchvision import datasets

    cls, folder, classes, title = {
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", 10, "CIFAR-10"),
        "cifar100": (datasets.CIFAR100, "cifar-100-python", 100, "CIFAR-100"),
    }[name]
    path = root / folder
    if not path.is_dir() and not download:
        raise _missing(title, path, download=False)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise _missing(title, path, download, str(err)) from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        splits.append(ImageTensorDataset(images, torch.as_tensor(ds.targets)))
    names = tuple(getattr(ds, "classes", None) or (str(i) for i in range(classes)))
    return splits[0], splits[1], names


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a usable image (``"empty file"``, ``"truncated: ..."``, ...), or None.

    A fast check: the header (format, size) and, for JPEG and PNG, the end marker that a
    truncated file lacks; other formats are verified by PIL.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            fmt = image.format
            if image.width < 1 or image.height < 1:
                return "image of size 0"
            if fmt not in ("JPEG", "PNG"):
                image.verify()
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    except (UnidentifiedImageError, ImportError):
        # ImportError: an opener patched in by another library (Ultralytics tries a HEIF
        # plugin for files PIL cannot identify) fails on a missing optional module.
        return "not a readable image"
    except (OSError, SyntaxError, ValueError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{'truncated' if 'truncat' in detail.lower() else 'unreadable'}: {detail}"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated: no JPEG end marker"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated: no PNG end chunk"
    return None


def find_bad_images(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """``(path, reason)`` for every path :func:`image_problem` rejects."""
    return [(str(p), why) for p in paths if (why := image_problem(p)) is not None]


def describe_bad_images(bad: list[tuple[str, str]], limit: int = 3) -> str:
    """``"a.jpg (empty file), b.png (truncated ...) and 4 more"``."""
    shown = ", ".join(f"{p} ({why})" for p, why in bad[:limit])
    return shown + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


class _ResizedImageFolder(Dataset):
    """An ImageFolder whose images are resized (shorter side) and centre-cropped (uint8)."""

    def __init__(self, path: Path, preprocessing: Preprocessing,
                 classes: list[str] | None = None) -> None:
        from torchvision import datasets

        self.preprocessing = preprocessing
        self.folder = datasets.ImageFolder(str(path))
        if classes is not None and self.folder.classes != classes:
            raise ValueError(f"the class folders of {path} ({self.folder.classes}) differ from "
                             f"the training set's ({classes})")

    def drop(self, paths: set[str]) -> None:
        """Leave out the images at ``paths``."""
        self.folder.samples = [s for s in self.folder.samples if s[0] not in paths]
        self.folder.imgs = self.folder.samples
        self.folder.targets = [label for _, label in self.folder.samples]

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[index]
        return self.preprocessing.resize_crop(self.folder.loader(path)), label


def _imagefolder(root: Path, preprocessing: Preprocessing, skip_bad_images: bool
                 ) -> tuple[Dataset, Dataset, tuple[str, ...], tuple[tuple[str, str], ...]]:
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"ImageFolder data not found at {root / split}: --data-root must hold train/ and "
                f"val/, each with one sub-folder of images per class"
            )
    train = _ResizedImageFolder(root / "train", preprocessing)
    val = _ResizedImageFolder(root / "val", preprocessing, train.folder.classes)
    bad = find_bad_images(p for split in (train, val) for p, _ in split.folder.samples)
    if bad and not skip_bad_images:
        raise ValueError(f"{len(bad)} unreadable image(s) in {root}: {describe_bad_images(bad)}. "
                         f"Replace or remove them, or pass --skip-bad-images to leave them out")
    for split in (train, val):
        split.drop({p for p, _ in bad})
        if not len(split):
            raise ValueError(f"no readable image left in {split.folder.root}")
    return train, val, tuple(train.folder.classes), tuple(bad)


def _first(ds: Dataset, n: int | None) -> Dataset:
    if n is not None and n < 1:
        raise ValueError(f"a dataset size limit must be positive, got {n}")
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


def _or_default(value: int | None, default: int, what: str) -> int:
    """``value`` unless None (0 and negatives are errors, never "unset")."""
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def build_data(
    name: str,
    root: str | Path = "data",
    *,
    image_size: int | None = None,
    download: bool = True,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> DataBundle:
    """Load (or generate) dataset ``name`` (one of :data:`DATASETS`).

    ``root`` holds the files: ``cifar-10-batches-py`` / ``cifar-100-python`` (downloaded there
    when ``download`` and the network allow) or, for ``imagefolder``, ``train/`` and ``val/``
    with one folder per class. A missing dataset is a ``FileNotFoundError`` naming the path.
    ``image_size`` is the side of the square images: 32 for CIFAR (the only size allowed),
    32 by default for ``synthetic`` and 224 for ``imagefolder``. ``train_size``/``val_size`` set
    the number of generated images for ``synthetic`` (default 5000/1000) and keep only the
    first images of the other datasets. ``seed`` is the synthetic data's generation seed.
    An ImageFolder with unreadable images is a ``ValueError`` naming them, unless
    ``skip_bad_images`` (then they are left out and listed in ``DataBundle.dropped``).
    """
    root = Path(root).expanduser()
    if name == "synthetic":
        size = _or_default(image_size, 32, "image_size")
        # Training and validation images are generated from different seeds: disjoint draws.
        return DataBundle(
            name, make_synthetic(_or_default(train_size, 5000, "train_size"), size, seed),
            make_synthetic(_or_default(val_size, 1000, "val_size"), size, seed + 1_000_003),
            SYNTHETIC_CLASSES, Preprocessing(size, size, *SYNTHETIC_STATS))
    if name in ("cifar10", "cifar100"):
        if image_size not in (None, 32):
            raise ValueError(f"{name} images are 32x32; --image-size {image_size} is not "
                             f"supported for it")
        train, val, classes = _cifar(name, root, download)
        stats = CIFAR10_STATS if name == "cifar10" else CIFAR100_STATS
        return DataBundle(name, _first(train, train_size), _first(val, val_size), classes,
                          Preprocessing(32, 32, *stats))
    if name == "imagefolder":
        size = _or_default(image_size, 224, "image_size")
        preprocessing = Preprocessing(size, size, *IMAGENET_STATS)
        train, val, classes, dropped = _imagefolder(root, preprocessing, skip_bad_images)
        return DataBundle(name, _first(train, train_size), _first(val, val_size), classes,
                          preprocessing, dropped)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
