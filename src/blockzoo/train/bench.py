"""``blockzoo bench-accuracy``: train every block x attention combination over several seeds.

A gain of half a point from one run says little: seeds alone move accuracy by that much. This
trains each combination ``seeds`` times with identical settings and reports the mean and the
standard deviation over seeds, next to what the combination costs (parameters, FLOPs at the
training input size, training throughput), so a block's effect can be read against the noise.

Layout of ``out``: ``runs/<block>-<attention>-s<seed>/`` (one training run each, with its own
``last.pt`` checkpoint), ``results.csv`` (one row per finished run), ``results.md`` (the table)
and ``accuracy_vs_flops.png``. Running the same command again skips the runs already in
``results.csv`` and resumes an interrupted run from its checkpoint. ``bench_config.json``
records the shared settings; a later call with other settings is refused, so a table never mixes
runs trained differently.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.counting import count_flops
from ..core.formatting import format_rows
from ..registry import block_info
from .config import TrainConfig
from .distributed import launched_by_torchrun
from .engine import train
from .metrics import read_metrics
from .run import CHECKPOINT, METRICS, PREVIOUS

#: ``--blocks`` name of the plain 3x3 convolution (the model's default, ``conv=None``).
PLAIN_CONV = "conv"
#: ``--attention`` name of "no attention" (``attention=None``).
NO_ATTENTION = "none"
RESULT_FIELDS = ("block", "attention", "seed", "val_acc", "best_val_acc", "params", "mflops",
                 "train_images_per_s", "epochs", "train_time_s")
#: Settings that may change between calls on the same ``out`` (they do not change results).
_FREE = ("conv", "attention", "seed", "out", "resume", "workers", "progress", "tensorboard",
         "download", "data_root", "device")


def _check_names(blocks: Sequence[str], attentions: Sequence[str]) -> None:
    if not blocks or not attentions:
        raise ValueError("give at least one block and one attention (or 'none')")
    for name in blocks:
        if name != PLAIN_CONV and block_info(name).kind != "conv":
            raise ValueError(f"--blocks takes conv-kind blocks or {PLAIN_CONV!r}; {name!r} is "
                             f"a {block_info(name).kind} block")
    for name in attentions:
        if name != NO_ATTENTION and block_info(name).kind != "attention":
            raise ValueError(f"--attention takes attention-kind blocks or {NO_ATTENTION!r}; "
                             f"{name!r} is a {block_info(name).kind} block")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` with numbers parsed."""
    path = Path(path)
    if not path.is_file():
        return []
    ints = ("seed", "params", "epochs")
    with open(path, newline="") as f:
        return [{k: v if k in ("block", "attention") else (int(v) if k in ints else float(v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def _shared_settings(base: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in base.to_dict().items() if k not in _FREE}


def _check_bench_config(out: Path, base: TrainConfig) -> None:
    path = out / "bench_config.json"
    settings = json.loads(json.dumps(_shared_settings(base)))  # tuples -> lists, as stored
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [f"{k} ({saved.get(k)!r} there, {v!r} now)" for k, v in settings.items()
                  if saved.get(k) != v]
        if differ:
            raise ValueError(f"{out} holds results trained with other settings: "
                             + "; ".join(differ) + ". Use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _run_row(block: str, attention: str, seed: int, config: TrainConfig) -> dict[str, Any]:
    """Train one combination (resuming its checkpoint if any) and measure its cost."""
    result = train(config)
    history = read_metrics(Path(config.out) / METRICS)
    model = result.model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        flops = count_flops(model, torch.zeros(1, 3, result.image_size, result.image_size,
                                               device=device))
    return {
        "block": block, "attention": attention, "seed": seed,
        "val_acc": history[-1]["val_acc"],
        "best_val_acc": max(r["val_acc"] for r in history),
        "params": result.params,
        "mflops": flops / 1e6,
        "train_images_per_s": statistics.fmean(r["train_images_per_s"] for r in history),
        "epochs": len(history),
        "train_time_s": sum(r["epoch_time_s"] for r in history),
    }


def summarize(rows: Sequence[dict[str, Any]], blocks: Sequence[str],
              attentions: Sequence[str]) -> list[dict[str, Any]]:
    """One row per combination (grid order): accuracy mean, sample std over seeds, costs.

    ``delta`` is the mean accuracy minus the plain conv without attention's (when in the grid).
    """
    table = []
    for block in blocks:
        for attention in attentions:
            runs = [r for r in rows if r["block"] == block and r["attention"] == attention]
            if not runs:
                continue
            accs = [r["val_acc"] for r in runs]
            table.append({
                "block": block, "attention": attention, "seeds": len(runs),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "params": runs[0]["params"],
                "mflops": runs[0]["mflops"],
                "train_images_per_s": statistics.fmean(r["train_images_per_s"] for r in runs),
            })
    base = [t for t in table if t["block"] == PLAIN_CONV and t["attention"] == NO_ATTENTION]
    for t in table:
        t["delta"] = t["acc_mean"] - base[0]["acc_mean"] if base else None
    return table


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (accuracy in %, mean +/- sample std over seeds)."""
    rows = [{
        "block": t["block"], "attention": t["attention"],
        "val acc % (mean ± std)": f"{t['acc_mean']:.2f} ± {t['acc_std']:.2f}",
        "Δ vs conv": "" if t["delta"] is None else f"{t['delta']:+.2f}",
        "seeds": t["seeds"], "params": f"{t['params']:,}", "MFLOPs": f"{t['mflops']:.2f}",
        "train img/s": f"{t['train_images_per_s']:.0f}",
    } for t in summary]
    return format_rows(rows, "markdown")


def plot_accuracy_vs_flops(summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Mean accuracy against MFLOPs, error bars of one std, one colour per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    blocks = list(dict.fromkeys(t["block"] for t in summary))
    attentions = list(dict.fromkeys(t["attention"] for t in summary))
    markers = "osD^v<>ph*"
    colors = plt.get_cmap("tab10")
    for t in summary:
        ax.errorbar(t["mflops"], t["acc_mean"], yerr=t["acc_std"], capsize=3, linestyle="none",
                    marker=markers[attentions.index(t["attention"]) % len(markers)],
                    color=colors(blocks.index(t["block"]) % 10))
        ax.annotate(f"{t['block']}+{t['attention']}", (t["mflops"], t["acc_mean"]),
                    textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xlabel("MFLOPs per image (forward, 2 per multiply-add)")
    ax.set_ylabel("validation accuracy % (mean ± std over seeds)")
    ax.set_title("blockzoo bench-accuracy: colour = block, marker = attention")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bench_accuracy(blocks: Sequence[str], attentions: Sequence[str], seeds: Sequence[int],
                   base: TrainConfig, out: str | Path = "runs/bench") -> list[dict[str, Any]]:
    """Train every ``block x attention x seed`` with ``base``'s other settings; the summary.

    Runs already in ``out/results.csv`` are skipped; an interrupted run resumes from its
    checkpoint. Writes ``results.csv``, ``results.md`` and ``accuracy_vs_flops.png`` to ``out``
    and returns :func:`summarize`'s rows. One process only (not under ``torchrun``).
    """
    if launched_by_torchrun():
        raise ValueError("bench-accuracy runs in a single process; start it without torchrun")
    _check_names(blocks, attentions)
    if not seeds:
        raise ValueError("give at least one seed")
    out = Path(out)
    _check_bench_config(out, base)
    results_path = out / "results.csv"
    rows = read_results(results_path)
    done = {(r["block"], r["attention"], r["seed"]) for r in rows}
    if not results_path.is_file():
        with open(results_path, "w", newline="") as f:
            csv.DictWriter(f, RESULT_FIELDS).writeheader()
    grid = [(b, a, s) for b in blocks for a in attentions for s in seeds]
    for i, (block, attention, seed) in enumerate(grid, 1):
        if (block, attention, seed) in done:
            print(f"[{i}/{len(grid)}] {block} + {attention}, seed {seed}: done, skipped",
                  file=sys.stderr)
            continue
        print(f"[{i}/{len(grid)}] {block} + {attention}, seed {seed}", file=sys.stderr)
        run_dir = out / "runs" / f"{block}-{attention}-s{seed}"
        config = dataclasses.replace(
            base, conv=None if block == PLAIN_CONV else block,
            attention=None if attention == NO_ATTENTION else attention, seed=seed,
            out=str(run_dir),
            resume=any((run_dir / name).is_file() for name in (CHECKPOINT, PREVIOUS)),
        )
        row = _run_row(block, attention, seed, config)
        with open(results_path, "a", newline="") as f:
            csv.DictWriter(f, RESULT_FIELDS).writerow(row)
        rows.append(row)
    summary = summarize([r for r in rows if r["seed"] in seeds], blocks, attentions)
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    plot_accuracy_vs_flops(summary, out / "accuracy_vs_flops.png")
    return summary
