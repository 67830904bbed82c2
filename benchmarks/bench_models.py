"""blockzoo's networks against their twins in torchvision and timm, on CPU.

Pairs (a twin must have exactly the same parameter count, checked before timing):

- ``resnet50`` against torchvision's ``resnet50`` and timm's ``resnet50``;
- ``mobilenetv2`` against torchvision's ``mobilenet_v2`` and timm's ``mobilenetv2_100``;
- ``se_resnet50`` against timm's ``seresnet50`` (SE with reduction 16 and biased FCs after the
  last BN of every bottleneck, as blockzoo's).

Passes: forward in eval mode under ``torch.no_grad()`` at batch 8, and forward + backward
(``out.sum().backward()``) in train mode at batch 4, 224 x 224, with 1 and 2 torch threads.
Every round times blockzoo and each twin once, one after the other (the order reversed every
other round), so load from other processes hits both; the table gives the median over the rounds
of the per-round ratio ``blockzoo / twin`` (below 1: blockzoo is faster) and its spread (the
lowest and highest per-round ratio). Forward peak memory is the peak of live bytes allocated
during one eval forward at batch 8 above what was live before it (torch profiler memory events,
``blockzoo.tools.profile.peak_memory``; the input and the parameters are not counted).

    python benchmarks/bench_models.py            # the table in docs/benchmarks.md
    python benchmarks/bench_models.py --quick    # a smoke run (2 rounds, 1 thread)
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import timm
import torch
import torchvision
from _common import Step, cpu_model, peak_bytes, sample_interleaved
from torch import nn

import blockzoo as bz
from blockzoo.core.formatting import format_rows

#: blockzoo model name -> its twins: (label, builder).
TWINS: dict[str, list[tuple[str, Callable[[], nn.Module]]]] = {
    "resnet50": [
        ("torchvision resnet50", torchvision.models.resnet50),
        ("timm resnet50", lambda: timm.create_model("resnet50")),
    ],
    "mobilenetv2": [
        ("torchvision mobilenet_v2", torchvision.models.mobilenet_v2),
        ("timm mobilenetv2_100", lambda: timm.create_model("mobilenetv2_100")),
    ],
    "se_resnet50": [
        ("timm seresnet50", lambda: timm.create_model("seresnet50")),
    ],
}

FORWARD_BATCH, TRAIN_BATCH, SIZE = 8, 4, 224


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_step(model: nn.Module, x: torch.Tensor) -> Step:
    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def train_step(model: nn.Module, x: torch.Tensor) -> Step:
    def step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def ratio_summary(mine: list[float], theirs: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 thread: a smoke run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (default 1,2)")
    parser.add_argument("--models", default=",".join(TWINS),
                        help=f"blockzoo models to compare (default {','.join(TWINS)})")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    threads = [1] if args.quick else [int(t) for t in args.threads.split(",")]
    passes = args.passes.split(",")
    names = args.models.split(",")
    unknown = sorted(set(names) - set(TWINS)) + sorted(set(passes) - {"fwd", "fwd+bwd"})
    if unknown:
        parser.error(f"unknown model or pass {unknown}; models: {list(TWINS)}, "
                     f"passes: fwd, fwd+bwd")

    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, list[tuple[str, nn.Module]]]] = {}
    for name in names:
        mine = bz.create_model(name)
        twins = []
        for label, build in TWINS[name]:
            twin = build()
            if count(twin) != count(mine):
                print(f"skipped {label}: {count(twin):,} parameters, {name} has "
                      f"{count(mine):,}")
                continue
            twins.append((label, twin))
        models[name] = (mine, twins)

    print(f"CPU: {cpu_model()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, timm {timm.__version__}; {rounds} interleaved rounds")
    x_fwd = torch.randn(FORWARD_BATCH, 3, SIZE, SIZE)
    x_train = torch.randn(TRAIN_BATCH, 3, SIZE, SIZE)
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for name, (mine, twins) in models.items():
            for pass_name in passes:
                train = pass_name == "fwd+bwd"
                make = train_step if train else forward_step
                x = x_train if train else x_fwd
                steps = {}
                for label, model in [("blockzoo", mine), *twins]:
                    model.train(train)
                    steps[label] = make(model, x)
                samples = sample_interleaved(steps, rounds)
                for label, _ in twins:
                    median, low, high = ratio_summary(samples["blockzoo"], samples[label])
                    rows.append({
                        "model": name, "twin": label, "threads": n_threads, "pass": pass_name,
                        "batch": x.shape[0],
                        "blockzoo ms": f"{statistics.median(samples['blockzoo']) * 1e3:.1f}",
                        "twin ms": f"{statistics.median(samples[label]) * 1e3:.1f}",
                        "blockzoo / twin": f"{median:.3f}", "spread": f"{low:.3f}-{high:.3f}",
                    })
                    print("  ".join(str(v) for v in rows[-1].values()), flush=True)
    print()
    print(format_rows(rows, "markdown"))

    torch.set_num_threads(threads[0])
    memory_rows = []
    for name, (mine, twins) in models.items():
        mine.eval()
        mine_bytes = peak_bytes(forward_step(mine, x_fwd))
        for label, model in twins:
            model.eval()
            theirs = peak_bytes(forward_step(model, x_fwd))
            memory_rows.append({
                "model": name, "twin": label, "blockzoo MiB": f"{mine_bytes / 2**20:.1f}",
                "twin MiB": f"{theirs / 2**20:.1f}",
                "blockzoo / twin": f"{mine_bytes / theirs:.3f}",
            })
    print()
    print(f"Forward peak memory (eval, no_grad, batch {FORWARD_BATCH}, {SIZE}x{SIZE}, "
          f"{threads[0]} thread(s))")
    print()
    print(format_rows(memory_rows, "markdown"))


if __name__ == "__main__":
    main()
