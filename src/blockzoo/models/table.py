"""The model table of ``docs/models.md``: measured parameters and FLOPs next to the papers'.

``python -m blockzoo.models.table`` prints it; ``python -m blockzoo.models.table docs/models.md``
rewrites the table between the ``<!-- models:start -->`` and ``<!-- models:end -->`` markers.
FLOPs are counted by :func:`blockzoo.core.count_flops` (2 per multiply-add, plus the
blocks' ``extra_flops`` hooks) for one forward pass at the model's ``default_cfg`` input size,
batch 1; ``gmacs`` is half of it, the unit the papers call FLOPs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..core.counting import count_flops
from ..core.formatting import format_rows, replace_between_markers
from .registry import create_model, list_models, model_info

START, END = "<!-- models:start -->", "<!-- models:end -->"


def _figure(value: float | None) -> str:
    """A paper's figure as printed (no rounding), empty where the paper gives none."""
    return "" if value is None else f"{value:g}"


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
            "arXiv": cfg["arxiv"],
        })
    return rows


def model_table(fmt: str = "markdown") -> str:
    """:func:`model_rows` rendered by :func:`~blockzoo.core.format_rows`."""
    return format_rows(model_rows(), fmt)


def update_doc(path: Path) -> bool:
    """Rewrite the table between the markers in ``path``; True when it changed."""
    return replace_between_markers(path, START, END, model_table())


if __name__ == "__main__":
    torch.manual_seed(0)
    if len(sys.argv) > 1:
        changed = update_doc(Path(sys.argv[1]))
        print(f"{sys.argv[1]}: model table " + ("updated" if changed else "already current"))
    else:
        print(model_table())
