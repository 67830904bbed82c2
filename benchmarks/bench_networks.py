"""Whole networks on CPU: rednet50 and acmix_resnet50 against torchvision's resnet50.

Forward (eval, ``no_grad``) at 224 x 224, batch 8, 1 and 2 threads, interleaved rounds in one
process: each network on blockzoo's compiled kernels (``after``) and on the PyTorch reference forms
(``before``, ``blockzoo.ops.fast_ops(False)``), as ratios to ``torchvision.models.resnet50``'s
time (their FLOPs are about 0.6x and 0.9x resnet50's).

    python benchmarks/bench_networks.py            # the table in docs/benchmarks.md (< 5 min)
    python benchmarks/bench_networks.py --quick    # a smoke run at 64 x 64, batch 1
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from _common import cpu_model, time_interleaved

import blockzoo as bz
from blockzoo import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small input, one round")
    parser.add_argument("--threads", type=str, default="1,2", help="torch thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batch, size, rounds = (1, 64, 1) if args.quick else (8, 224, args.rounds)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    nets = {"resnet50": torchvision.models.resnet50().eval()}
    for name in ("rednet50", "acmix_resnet50"):
        nets[name] = bz.create_model(name).eval()

    def step(net: torch.nn.Module, fast: bool):
        def run() -> None:
            with torch.no_grad(), ops.fast_ops(fast):
                net(x)

        return run

    steps = {"resnet50": step(nets["resnet50"], False)}
    for name in ("rednet50", "acmix_resnet50"):
        steps[f"{name} before"] = step(nets[name], False)
        steps[f"{name} after"] = step(nets[name], True)
    print(f"torch {torch.__version__}, {cpu_model()}, fast ops: {ops.path_description()}")
    print(f"forward, batch {batch}, {size}x{size}, median of {rounds} interleaved rounds\n")
    print("| threads | resnet50 ms | rednet50 before | rednet50 after "
          "| acmix_resnet50 before | acmix_resnet50 after |")
    print("|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        t = time_interleaved(steps, rounds)
        base = t["resnet50"]
        cells = " | ".join(f"{t[name] / base:.2f}" for name in list(steps)[1:])
        print(f"| {threads} | {base * 1e3:.0f} | {cells} |")
    print("\nratios: time / resnet50's time in the same round")


if __name__ == "__main__":
    main()
