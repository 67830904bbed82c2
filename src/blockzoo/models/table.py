"""The model table of ``docs/models.md``: measured parameters and FLOPs next to the papers'.

``python -m blockzoo.models.table`` prints it; ``python -m blockzoo.models.table docs/models.md``
rewrites the table between the ``<!-- models:start -->`` and ``<!-- models:end -->`` markers, and
the table of the authors' released checkpoints (:func:`weights_rows`, from each model's
``default_cfg["weights"]``) between ``<!-- weights:start -->`` and ``<!-- weights:end -->``.
FLOPs are counted by :func:`blockzoo.core.count_flops` (2 per multiply-add, plus the
blocks' ``extra_flops`` hooks) for one forward pass at the model's ``default_cfg`` input size,
batch 1; ``gmacs`` is half of it, the unit the papers call FLOPs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..core.counting import count_flops
from ..core.formatting import format_rows, replace_between_markers
from .pretrained import LAYOUTS, ReleasedWeights
from .registry import create_model, list_models, model_info

START, END = "<!-- models:start -->", "<!-- models:end -->"
WEIGHTS_START, WEIGHTS_END = "<!-- weights:start -->", "<!-- weights:end -->"


def _figure(value: float | None) -> str:
    """A paper's figure as printed (no rounding), empty where the paper gives none."""
    return "" if value is None else f"{value:g}"


def weights_source(weights: ReleasedWeights) -> str:
    """Who publishes a checkpoint, from its page: ``torchvision`` or the GitHub ``owner/repo``."""
    if "pytorch.org" in weights.page:
        return "torchvision"
    match = re.search(r"github\.com/([^/#]+/[^/#]+)", weights.page)
    return match.group(1) if match else weights.page


def _weights_cell(cfg: Any) -> str:
    """The released checkpoints of a model in one cell: ``source top-1 (license)``."""
    return "; ".join(
        f"{weights_source(w)}{'' if w.top1 is None else f' {w.top1:g}'} ({w.license})"
        for w in cfg["weights"]
    )


def weights_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per released checkpoint: source, page, direct URL, reported top-1, license,
    SHA-256 (or its published prefix), key layout and whether blockzoo reads it."""
    rows = []
    for name in names or list_models():
        for w in model_info(name).default_cfg["weights"]:
            rows.append({
                "model": name,
                "tag": w.tag,
                "source": weights_source(w),
                "page": w.page,
                "direct URL": w.url or "none (browser download from the page)",
                "reported top-1": _figure(w.top1),
                "license": w.license,
                "SHA-256": w.sha256 or "not published",
                "layout": w.layout,
                "loads": "yes" if w.layout in LAYOUTS else "no",
            })
    return rows


def model_rows(names: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One row per model: measured parameters and FLOPs, and the paper's figures.

    Building and counting every model takes minutes: ``progress`` (default) draws a progress
    bar (model name, count, elapsed and remaining time) on stderr.
    """
    rows = []
    names = names or list_models()
    bar = tqdm(names, desc="models", unit="model", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        cfg = model_info(name).default_cfg
        model = create_model(name, num_classes=cfg["num_classes"]).eval()
        params = sum(p.numel() for p in model.parameters())
        x = torch.randn(1, *cfg["input_size"])
        with torch.no_grad():
            flops = count_flops(model, x)
        paper_params = cfg["paper_params_m"]
        rows.append({
            "model": name,
            "params": params,
            "paper params (M)": _figure(paper_params),
            "vs paper": "" if paper_params is None
            else f"{100 * (params / 1e6 / paper_params - 1):+.2f}%",
            "input": "x".join(map(str, cfg["input_size"][1:])),
            "GFLOPs": f"{flops / 1e9:.3f}",
            "GMACs": f"{flops / 2e9:.3f}",
            "paper GMACs": _figure(cfg["paper_gmacs"]),
            "paper top-1": _figure(cfg["paper_top1"]),
            "released weights (source top-1, license)": _weights_cell(cfg),
            "arXiv": cfg["arxiv"],
        })
    return rows


def model_table(fmt: str = "markdown") -> str:
    """:func:`model_rows` rendered by :func:`~blockzoo.core.format_rows`."""
    return format_rows(model_rows(), fmt)


def update_doc(path: Path) -> bool:
    """Rewrite the model table and the released-weights table between their markers in
    ``path``; True when it changed."""
    weights = replace_between_markers(path, WEIGHTS_START, WEIGHTS_END,
                                      format_rows(weights_rows(), "markdown"))
    return replace_between_markers(path, START, END, model_table()) or weights


if __name__ == "__main__":
    torch.manual_seed(0)
    if len(sys.argv) > 1:
        changed = update_doc(Path(sys.argv[1]))
        print(f"{sys.argv[1]}: model table " + ("updated" if changed else "already current"))
    else:
        print(model_table())
