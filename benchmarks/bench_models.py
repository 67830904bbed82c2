"""blockzoo's networks against their twins in torchvision and timm, on CPU.

Twins (a twin must have exactly the same parameter count, checked before timing):

- ``resnet50`` against torchvision's ``resnet50`` and timm's ``resnet50``;
- ``mobilenetv2`` against torchvision's ``mobilenet_v2`` and timm's ``mobilenetv2_100``;
- ``se_resnet50`` against timm's ``seresnet50`` (SE with reduction 16 and biased FCs after the
  last BN of every bottleneck, as blockzoo's).

Passes: forward in eval mode under ``torch.no_grad()`` at batch 8, and forward + backward (of
the output's sum) in train mode at batch 4, 224 x 224, with 1 and 2 torch threads. Each pair is
timed by ``blockzoo.tools.profile.compare_models``: twin and blockzoo alternate in rounds in one
process (the order swapped every round), each round gives the ratio ``blockzoo / twin`` (below
1: blockzoo is faster), and the table gives the median ratio with its bootstrap 95% interval.
With one thread a sample is the thread's CPU time, with two it is wall-clock time. Peak memory
is the peak of live bytes allocated during one pass above what was live before it (torch
profiler memory events, ``blockzoo.tools.profile.peak_memory``; input and parameters excluded).

    python benchmarks/bench_models.py                              # the table (< 6 min idle)
    python benchmarks/bench_models.py --doc docs/benchmarks.md     # and put it in the doc
    python benchmarks/bench_models.py --quick                      # smoke run: 1 thread, 112x112
    python benchmarks/bench_models.py --control    # + each first twin against a copy of itself
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

import blockzoo as bz
from blockzoo.core import count_parameters, format_rows, replace_between_markers
from blockzoo.tools.profile import compare_models, load_average, machine_info

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

#: pass name -> (batch, backward)
PASSES = {"fwd": (8, False), "fwd+bwd": (4, True)}
MARKERS = ("<!-- bench-models:start -->", "<!-- bench-models:end -->")


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def build_pairs(
    names: list[str], control: bool = False
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, blockzoo model, twin label, twin)`` for every twin with the same parameters.

    With ``control``, each model's first twin is also paired with a second instance of itself
    (label ``"<twin> (2nd instance)"``): the same code and operators, so its ratio shows how far
    two instances of one network differ on this machine (memory placement and noise), the
    resolution of every other row.
    """
    pairs = []
    for name in names:
        torch.manual_seed(0)
        mine = bz.create_model(name)
        for index, (label, build) in enumerate(TWINS[name]):
            twin = build()
            if count_parameters(twin) != count_parameters(mine):
                print(f"skipped {label}: {count_parameters(twin):,} parameters, blockzoo "
                      f"{name} has {count_parameters(mine):,}")
                continue
            pairs.append((name, mine, label, twin))
            if control and index == 0:
                pairs.append((f"{label} (2nd instance)", build(), label, twin))
    return pairs


def measure(
    pairs: list[tuple[str, nn.Module, str, nn.Module]],
    threads: list[int],
    passes: list[str],
    size: int,
    budget: float,
    min_rounds: int,
) -> list[dict]:
    rows = []
    for n_threads in threads:
        for name, mine, label, twin in pairs:
            for pass_name in passes:
                batch, backward = PASSES[pass_name]
                twin_row, mine_row = compare_models(
                    [(label, twin), (name, mine)], input_size=(batch, 3, size, size),
                    backward=backward, threads=n_threads, budget=budget, min_rounds=min_rounds,
                    tolerance=0.02,
                )
                rows.append({
                    "model": name,
                    "twin": label,
                    "threads": n_threads,
                    "pass": pass_name,
                    "batch": batch,
                    "twin ms": f"{twin_row['machine_ms']:.1f}",
                    "blockzoo ms": f"{mine_row['machine_ms']:.1f}",
                    "blockzoo / twin [95%]": f"{mine_row['latency_x']:.3f} "
                    f"[{mine_row['latency_x_low']:.3f}, {mine_row['latency_x_high']:.3f}]",
                    "rounds": mine_row["rounds"],
                    "twin peak MiB": f"{twin_row['peak_mem_mb']:.1f}",
                    "blockzoo peak MiB": f"{mine_row['peak_mem_mb']:.1f}",
                    "peak x": f"{mine_row['memory_x']:.3f}",
                    "warning": mine_row["warning"],
                })
                print("  ".join(str(v) for v in rows[-1].values()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 thread, 112x112, short budget (not representative)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (default 1,2)")
    parser.add_argument("--models", default=",".join(TWINS),
                        help=f"blockzoo models (default {','.join(TWINS)})")
    parser.add_argument("--passes", default=",".join(PASSES), help="fwd, fwd+bwd or both")
    parser.add_argument("--budget", type=float, default=5.0,
                        help="seconds of paired rounds per pair (default 5)")
    parser.add_argument("--min-rounds", type=int, default=5, help="rounds at least (default 5)")
    parser.add_argument("--control", action="store_true",
                        help="also time each model's first twin against a second instance of "
                        "itself (the resolution of the table)")
    parser.add_argument("--doc", type=Path, help="also write the table between the "
                        f"{MARKERS[0]} markers of this file")
    args = parser.parse_args()
    names, passes = args.models.split(","), args.passes.split(",")
    unknown = sorted(set(names) - set(TWINS)) + sorted(set(passes) - set(PASSES))
    if unknown:
        parser.error(f"unknown model or pass {unknown}; models: {', '.join(TWINS)}; "
                     f"passes: {', '.join(PASSES)}")
    threads = [1] if args.quick else [int(t) for t in args.threads.split(",")]
    size, budget = (112, 0.5) if args.quick else (224, args.budget)
    min_rounds = 3 if args.quick else args.min_rounds

    start, load_before = time.perf_counter(), load_average()
    info = machine_info("cpu", threads[0])
    print(f"CPU: {info['cpu']}, {info['cores']} cores, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, timm {timm.__version__}; load average {_load(load_before)}")
    rows = measure(build_pairs(names, args.control), threads, passes, size, budget, min_rounds)
    table = format_rows(rows, "markdown")
    minutes = (time.perf_counter() - start) / 60
    footer = (f"CPU {info['cpu']} ({info['cores']} cores), torch {torch.__version__}; "
              f"{size}x{size}; 1-minute load average {_load(load_before)} before, "
              f"{_load(load_average())} after; {minutes:.1f} min.")
    print()
    print(table)
    print()
    print(footer)
    if args.doc:
        replace_between_markers(args.doc, *MARKERS, f"{table}\n\n{footer}")
        print(f"wrote the table into {args.doc}")


if __name__ == "__main__":
    main()
