"""Whole networks for the command line: find them by name, build them, edit them by glob.

A name is looked up in blockzoo's model registry first, then in torchvision's and timm's
(built without weights, so nothing is downloaded). Module globs (``'layer*.*.bn2'``) are matched
with :func:`fnmatch.fnmatchcase` against the qualified module names of ``model.named_modules()``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from ..models import create_model, list_models, model_info
from ..registry import block_info, list_blocks, unknown_name
from ..surgery import SurgeryReport, insert_after, insert_before, replace_convs

SOURCES = ("blockzoo", "torchvision", "timm")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def model_names(source: str) -> list[str]:
    """Every model name ``source`` (one of :data:`SOURCES`) can build."""
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of {SOURCES}")
    return {"blockzoo": list_models, "torchvision": _torchvision_names,
            "timm": _timm_names}[source]()


def model_rows(pattern: str = "*", sources: tuple[str, ...] = ("blockzoo",)) -> list[dict]:
    """One row per model whose name matches the glob ``pattern``, from ``sources``."""
    rows: list[dict[str, Any]] = []
    for source in sources:
        for name in model_names(source):
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            row = {"model": name, "source": source, "input": "3x224x224", "arxiv": "",
                   "paper": ""}
            if source == "blockzoo":
                cfg = model_info(name).default_cfg
                row.update(input="x".join(map(str, cfg["input_size"])), arxiv=cfg["arxiv"],
                           paper=cfg["paper"])
            rows.append(row)
    return rows


def build_model(name: str, num_classes: int = 1000) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model called ``name`` (blockzoo, torchvision or timm; no weights) in eval mode,
    and its default ``(C, H, W)`` input size. ``KeyError`` with close matches if unknown."""
    if name in list_models():
        model = create_model(name, num_classes=num_classes)
        return model.eval(), tuple(model.default_cfg["input_size"])
    if name in _torchvision_names():
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval(), (
            3, 224, 224)
    if name in _timm_names():
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return model.eval(), tuple(size)
    known = list_models() + _torchvision_names() + _timm_names()
    raise unknown_name("model", name, known, "blockzoo models '*' --source all")


def is_model_name(name: str) -> bool:
    """True when ``name`` is a model (and not a registered block)."""
    if name in list_blocks():
        return False
    return name in list_models() or name in _torchvision_names() or name in _timm_names()


def glob_where(pattern: str) -> Callable[[str, nn.Module], bool]:
    """A surgery ``where`` that matches qualified module names against a glob (fnmatch)."""

    def where(name: str, module: nn.Module) -> bool:
        return fnmatch.fnmatchcase(name, pattern)

    where.__name__ = f"glob({pattern!r})"
    return where


def edit_model(
    model: nn.Module,
    *,
    insert: str | None = None,
    after: str | None = None,
    before: str | None = None,
    replace: str | None = None,
    where: str | None = None,
) -> SurgeryReport:
    """Apply one edit in place: ``insert`` a block after/before the modules matching a glob,
    or ``replace`` the convs (all, or those matching ``where``) with a conv-kind block.

    Raises ``ValueError`` when the glob matches nothing the edit can use.
    """
    if (insert is None) == (replace is None):
        raise ValueError("give exactly one of --insert BLOCK or --replace BLOCK")
    if insert is not None:
        block_info(insert)
        if (after is None) == (before is None):
            raise ValueError("--insert needs exactly one of --after GLOB or --before GLOB")
        pattern = after if after is not None else before
        edit = insert_after if after is not None else insert_before
        report = edit(model, insert, glob_where(pattern))
        what = f"--{'after' if after is not None else 'before'} {pattern!r}"
    else:
        block_info(replace)
        pattern = where or "*"
        report = replace_convs(model, replace, glob_where(pattern))
        what = f"--where {pattern!r}"
    if not report.changes:
        skipped = f" ({len(report.skipped)} skipped: {report.skipped[0][1]})" if (
            report.skipped) else ""
        names = [n for n, _ in model.named_modules() if n]
        examples = names[len(names) // 5 :: max(1, len(names) // 5)][:4]
        raise ValueError(f"{what} matched no module that can take {insert or replace!r}"
                         f"{skipped}; module names look like {', '.join(examples)}")
    return report
