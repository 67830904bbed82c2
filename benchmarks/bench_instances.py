"""Several instances of a blockzoo network and of its torchvision twin, timed in one process.

Two instances of one network can differ by a few percent on a busy or page-faulting machine
(where their weights and buffers lie in memory). This script builds ``--instances`` of each side,
runs them all in interleaved rounds (order reversed every other round), takes each instance's
median CPU time (one thread), and prints the median over instances of each side and their ratio,
so that one instance's luck does not decide the comparison.

    python benchmarks/bench_instances.py                                  # mobilenetv2, 3 + 3
    python benchmarks/bench_instances.py --model resnet50 --twin resnet50 --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import blockzoo as bz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilenetv2", help="blockzoo model name")
    parser.add_argument("--twin", default="mobilenet_v2", help="torchvision model name")
    parser.add_argument("--instances", type=int, default=3, help="instances of each side")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    models = [("blockzoo", bz.create_model(args.model).eval()) for _ in range(args.instances)]
    models += [("torchvision", getattr(torchvision.models, args.twin)().eval())
               for _ in range(args.instances)]
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _, model in models:
            model(x)
        for r in range(args.rounds):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                start = time.process_time()
                models[i][1](x)
                times[i].append(time.process_time() - start)
    medians = [1e3 * statistics.median(t) for t in times]
    for (label, _), ms in zip(models, medians, strict=True):
        print(f"{label:12s} {ms:8.1f} ms")
    mine = statistics.median(medians[: args.instances])
    twin = statistics.median(medians[args.instances:])
    print(f"{args.model} / torchvision {args.twin}: {mine:.1f} / {twin:.1f} ms = {mine / twin:.4f} "
          f"(median over {args.instances} instances each, {args.rounds} rounds, 1 thread, "
          "CPU time)")


if __name__ == "__main__":
    main()
