"""Draw what a block computes on a real image.

The image goes through a small fixed feature extractor (torchvision's ResNet-18 stem and first
stage, random weights with seed 0: no pretrained weights are downloaded), then through the block,
whose ``explain(x)`` hook returns a dict of tensors. The visualiser draws the entries it knows by
name, so it never reaches into a block's private attributes:

- ``context_mask``, ``attention_map`` ``(N, H, W)``: a heatmap over the image (GC's softmax
  context mask, coordinate attention's ``a_h x a_w``);
- ``channel_gate`` ``(N, C)``, ``routing_weights`` ``(N, K)``: bar charts (SE's gate,
  dynamic/cond conv expert weights);
- ``branch_weights`` ``(N, M, C)``: per-branch bars over the first channels (SK: small vs large
  kernel);
- ``kernels`` ``(N, G, K, K, H, W)`` and ``attention`` ``(N, heads, K * K, H, W)``: the
  ``K x K`` local kernel or attention window at three positions (involution, ACmix);
- ``sampling_points`` ``(N, H, W, P, 2)``: the ``(y, x)`` input positions sampled for three output
  positions (deformable convolution).

Other entries (raw offsets, masks, aggregated dynamic kernels) are not drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.base import Block, ExplainKey
from ..registry import block_info, create_block

FEATURE_CHANNELS = 64
FEATURE_STRIDE = 4
EXTRACTOR_CAPTION = (
    "features: torchvision ResNet-18 stem + layer1, random weights (seed 0), stride 4, 64 ch"
)
_POSITIONS = ((0.3, 0.35), (0.5, 0.5), (0.7, 0.65))
_COLOURS = ("tab:red", "tab:cyan", "tab:orange")


def feature_extractor(seed: int = 0) -> nn.Module:
    """ResNet-18 conv1/bn/relu/maxpool/layer1 with deterministic random weights."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    net = resnet18(weights=None)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1).eval()


def load_image(path: str | Path | None, size: int) -> np.ndarray:
    """An RGB float image in [0, 1], resized to ``size x size``; default: the astronaut."""
    if path is None:
        from skimage.data import astronaut

        image = astronaut()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        from skimage.io import imread

        image = imread(path)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if image.max() > 1.0:
        image = image / 255.0
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return tensor[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _normalise(image: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((torch.from_numpy(image).permute(2, 0, 1) - mean) / std)[None]


def _positions(h: int, w: int) -> list[tuple[int, int]]:
    return [(min(h - 1, int(fy * h)), min(w - 1, int(fx * w))) for fy, fx in _POSITIONS]


def _local_windows(key: str, value: np.ndarray) -> np.ndarray | None:
    """``(G, K, K, H, W)`` local kernels/windows from an ``explain`` entry, else None."""
    if key == ExplainKey.KERNELS and value.ndim == 5:
        return value
    if key == ExplainKey.ATTENTION and value.ndim == 4:
        k = int(round(value.shape[1] ** 0.5))
        return value.reshape(value.shape[0], k, k, *value.shape[2:])
    return None


def _drawable(key: str, value: np.ndarray) -> bool:
    return (
        (key in _HEATMAPS and value.ndim == 2)
        or (key in _BARS and value.ndim == 1)
        or (key == ExplainKey.BRANCH_WEIGHTS and value.ndim == 2)
        or (key == ExplainKey.SAMPLING_POINTS and value.ndim == 4)
        or _local_windows(key, value) is not None
    )


_HEATMAPS = (ExplainKey.CONTEXT_MASK, ExplainKey.ATTENTION_MAP)
_BARS = {ExplainKey.CHANNEL_GATE: "channel", ExplainKey.ROUTING_WEIGHTS: "expert"}


def _draw(ax, fig, key: str, value: np.ndarray, image: np.ndarray, feature_hw: tuple) -> None:
    size = image.shape[0]
    windows = _local_windows(key, value)
    if key in _HEATMAPS:
        heat = F.interpolate(torch.from_numpy(value)[None, None].float(), size=(size, size),
                             mode="bilinear", align_corners=False)[0, 0].numpy()
        ax.imshow(image)
        im = ax.imshow(heat, cmap="jet", alpha=0.5)
        fig.colorbar(im, ax=ax, fraction=0.046, label=key)
    elif key in _BARS:
        ax.bar(np.arange(len(value)), value, color="tab:blue", label=key)
        ax.set_xlabel(_BARS[key])
        ax.legend(loc="upper right")
    elif key == ExplainKey.BRANCH_WEIGHTS:
        shown = value[:, :32]
        width = 0.8 / len(shown)
        for m, row in enumerate(shown):
            ax.bar(np.arange(len(row)) + m * width, row, width=width, label=f"branch {m + 1}")
        ax.set_xlabel("channel (first 32); branches from small to large kernel")
        ax.legend(loc="upper right")
    elif windows is not None:
        kernels = windows[0]
        k = kernels.shape[0]
        positions = _positions(*kernels.shape[2:])
        tiles = np.full((k, 3 * k + 2), np.nan)
        for i, (y, x) in enumerate(positions):
            tiles[:, i * (k + 1): i * (k + 1) + k] = kernels[:, :, y, x]
        im = ax.imshow(tiles, cmap="coolwarm")
        fig.colorbar(im, ax=ax, fraction=0.046, label=f"{key} (group/head 0)")
        ax.set_xticks([i * (k + 1) + k / 2 - 0.5 for i in range(3)],
                      [f"pos {i + 1}" for i in range(3)])
        for i in range(len(positions)):
            ax.get_xticklabels()[i].set_color(_COLOURS[i])
    else:  # sampling_points (H, W, P, 2) in input-feature pixels
        ax.imshow(image)
        scale = size / feature_hw[1]
        for i, (y, x) in enumerate(_positions(*value.shape[:2])):
            pts = (value[y, x] + 0.5) * scale
            ax.scatter(pts[:, 1], pts[:, 0], s=12, color=_COLOURS[i], label=f"pos {i + 1}")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_title(key, fontsize=9)


def visualize(
    name: str, image: str | Path | None = None, out: str | Path | None = None, size: int = 224
) -> Path:
    """Write a PNG with the image and what block ``name`` computes on its features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = block_info(name)
    block = create_block(name, FEATURE_CHANNELS).eval()
    if type(block).explain is Block.explain:
        raise ValueError(f"block {name!r} has no explain() hook to draw; blocks with one: "
                         f"{', '.join(_drawable_names())}")
    picture = load_image(image, size)
    with torch.no_grad():
        features = feature_extractor()(_normalise(picture))
        explained = {k: v.detach().float()[0].numpy() for k, v in block.explain(features).items()
                     if v.dim() > 1}
        out_hw = tuple(block(features).shape[-2:])
    explained = {k: v for k, v in explained.items() if _drawable(k, v)}
    if not explained:
        raise ValueError(f"block {name!r} explains nothing this visualiser can draw")
    feature_hw = tuple(features.shape[-2:])
    panels = len(explained)
    fig, axes = plt.subplots(1, panels + 1, figsize=(5 * (panels + 1), 5), dpi=100)
    axes[0].imshow(picture)
    if any(k == ExplainKey.SAMPLING_POINTS or _local_windows(k, v) is not None
           for k, v in explained.items()):
        scale = size / out_hw[-1]
        for i, (y, x) in enumerate(_positions(*out_hw)):
            axes[0].scatter([(x + 0.5) * scale], [(y + 0.5) * scale], s=60, marker="x",
                            color=_COLOURS[i], label=f"pos {i + 1}")
        axes[0].legend(loc="upper right", fontsize=7)
    axes[0].set_title("input image", fontsize=9)
    axes[0].set_xlabel(EXTRACTOR_CAPTION, fontsize=7)
    for ax, (key, value) in zip(axes[1:], explained.items(), strict=True):
        _draw(ax, fig, key, value, picture, feature_hw)
    fig.suptitle(f"blockzoo viz: {name} - {info.paper} (arXiv {info.arxiv})", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else Path("reports") / f"viz_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _drawable_names() -> list[str]:
    from ..registry import list_blocks

    return [n for n in list_blocks() if block_info(n).cls.explain is not Block.explain]
