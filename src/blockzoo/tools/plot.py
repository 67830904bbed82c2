"""Plots of comparison tables (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_compare(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """FLOPs against latency, one labelled point per block, marker area ~ parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    largest = max((r["params"] for r in rows), default=1) or 1
    for r in rows:
        baseline = r["kind"] == "baseline"
        area = 30 + 600 * r["params"] / largest
        ax.scatter(r["mflops"], r["latency_ms"], s=area, alpha=0.6,
                   marker="s" if baseline else "o", color="grey" if baseline else None,
                   edgecolors="black", linewidths=0.5)
        ax.annotate(r["block"], (r["mflops"], r["latency_ms"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("MFLOPs (2 per multiply-add)")
    ax.set_ylabel("latency, median (ms)")
    ax.set_title(title or "blockzoo compare: FLOPs vs latency (marker area ~ parameters)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
