"""Plots of comparison tables (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _name(row: dict[str, Any]) -> str:
    return str(row.get("block", row.get("model", "")))


def _overlapping(boxes: list) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


def repel_labels(fig: Any, labels: list, iterations: int = 300, pad_px: float = 2.0) -> int:
    """Move annotation ``labels`` apart vertically until no two overlap; returns the overlaps
    left (0 unless ``iterations`` ran out). Labels keep an arrow to their point."""
    renderer = fig.canvas.get_renderer()
    points_per_px = 72.0 / fig.dpi
    for _ in range(iterations):
        boxes = [label.get_window_extent(renderer) for label in labels]
        pairs = _overlapping(boxes)
        if not pairs:
            return 0
        for i, j in pairs:
            lower, upper = (i, j) if boxes[i].y0 <= boxes[j].y0 else (j, i)
            push = ((boxes[lower].y1 - boxes[upper].y0) / 2 + pad_px) * points_per_px
            for index, sign in ((lower, -1), (upper, 1)):
                x, y = labels[index].xyann
                labels[index].xyann = (x, y + sign * push)
    return len(_overlapping([label.get_window_extent(renderer) for label in labels]))


def compare_figure(rows: Sequence[dict[str, Any]], title: str = "") -> tuple[Any, list]:
    """The figure of :func:`plot_compare` and its point labels (annotations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    shown = [r for r in rows if r.get("flops_x") and r.get("latency_x")]
    largest = max((r["params"] for r in shown), default=1) or 1
    labels = []
    for r in shown:
        baseline = r["kind"] == "baseline"
        low, high = r.get("latency_x_low", r["latency_x"]), r.get("latency_x_high", r["latency_x"])
        ax.errorbar(r["flops_x"], r["latency_x"],
                    yerr=[[r["latency_x"] - low], [high - r["latency_x"]]], fmt="none",
                    ecolor="grey", elinewidth=0.8, capsize=2)
        ax.scatter(r["flops_x"], r["latency_x"], s=30 + 600 * r["params"] / largest, alpha=0.6,
                   marker="s" if baseline else "o", color="grey" if baseline else None,
                   edgecolors="black", linewidths=0.5, zorder=3)
        labels.append(ax.annotate(
            _name(r), (r["flops_x"], r["latency_x"]), textcoords="offset points", xytext=(8, 4),
            fontsize=8, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5}))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs / baseline's FLOPs (flops_x)")
    ax.set_ylabel("latency / baseline's latency (latency_x, paired; bar: 95% interval)")
    ax.set_title(title or "blockzoo compare: cost relative to the baseline "
                 "(marker area ~ parameters)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    repel_labels(fig, labels)
    return fig, labels


def plot_compare(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """``flops_x`` against ``latency_x`` (log-log), one labelled point per row (rows without
    FLOPs, such as the identity, are left out), labels moved apart so that none overlap."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, _ = compare_figure(rows, title)
    fig.savefig(path)
    plt.close(fig)
    return path
