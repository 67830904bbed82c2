"""Paired latency ratios on an idle and on a loaded machine: do the figures survive the load?

``latency_x`` of se, gc, coord_att, dynamic_conv and sk_conv against the profiler's baseline
(3x3 conv + BN + ReLU, ``blockzoo.layers.ConvNormAct``) at 8x64x56x56, forward, float32, one
torch thread, measured by ``blockzoo.compare`` (paired rounds: baseline and block alternate in
one process; median ratio, bootstrap 95% interval, rounds until the interval is within +-10% or
``--budget`` seconds per block run out). Measured twice in one run:

- **idle**: nothing but this process (whatever else the machine runs, it is reported: the
  1-minute load average before and after);
- **loaded**: while one busy-loop process per core (``os.cpu_count()``) spins. The script starts
  them and stops them itself; each also stops by itself after ``--budget * 6 + 60`` seconds.

The target: every loaded ``latency_x`` within 25% of the idle one (``loaded/idle`` in 0.8-1.25),
where absolute times (``ms``) may be far off.

    python benchmarks/bench_paired_timing.py               # the table (< 5 min; ~2 at --budget 5)
    python benchmarks/bench_paired_timing.py --budget 1    # a smoke run (< 1 min)
    python benchmarks/bench_paired_timing.py --doc docs/profiling.md   # also put it in the doc
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from blockzoo.core import format_rows, replace_between_markers
from blockzoo.tools.profile import compare, load_average, machine_info

BLOCKS = ("se", "gc", "coord_att", "dynamic_conv", "sk_conv")
SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def _measure(budget: float) -> dict[str, dict]:
    rows = compare(list(BLOCKS), in_channels=64, input_size=(56, 56), batch=8, threads=1,
                   budget=budget, identity=False)
    return {row["block"]: row for row in rows if row["block"] in BLOCKS}


def _busy_loops(seconds: float) -> list[subprocess.Popen]:
    """One spinning Python process per core, each ending by itself after ``seconds``."""
    code = SPIN.format(seconds=seconds)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _interval(row: dict) -> str:
    return f"{row['latency_x']:.3f} [{row['latency_x_low']:.3f}, {row['latency_x_high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=5.0,
                        help="seconds of paired timing per block and phase (default 5)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="also write the output between the bench-paired markers of DOC")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    load_before = load_average()
    idle = _measure(args.budget)
    loops = _busy_loops(args.budget * 6 + 60)
    try:
        time.sleep(1.0)  # let the loops reach full speed
        loaded = _measure(args.budget)
        load_loaded = load_average()
    finally:
        for proc in loops:
            proc.terminate()
        for proc in loops:
            proc.wait()
    machine = machine_info("cpu", 1)
    header = (f"Machine: {machine['cpu']}, {machine['cores']} cores, 1 thread used, torch "
              f"{machine['torch']}, device cpu, clock {machine['clock']}; 1-minute load average "
              f"{_load(load_before)} before the idle phase, {_load(load_loaded)} at the end of "
              "the loaded phase.")
    rows = []
    for name in BLOCKS:
        a, b = idle[name], loaded[name]
        rows.append({
            "block": name,
            "latency_x idle [95%]": _interval(a),
            "latency_x loaded [95%]": _interval(b),
            "loaded/idle": round(b["latency_x"] / a["latency_x"], 3),
            "rounds idle/loaded": f"{a['rounds']}/{b['rounds']} ({a['timing']}/{b['timing']})",
            "block ms idle": a["machine_ms"],
            "block ms loaded": b["machine_ms"],
        })
    worst = max(abs(r["loaded/idle"] - 1) for r in rows)
    text = "\n".join([
        header, "", format_rows(rows, "markdown"), "",
        f"Largest loaded/idle deviation: {100 * worst:.1f}% (target: within 25%); "
        f"{len(loops)} busy loops; total {time.perf_counter() - start:.0f} s; `--budget "
        f"{args.budget:g}`.",
    ])
    print(text)
    if args.doc is not None:
        replace_between_markers(args.doc, "<!-- bench-paired:start -->",
                                "<!-- bench-paired:end -->", text)


if __name__ == "__main__":
    main()
