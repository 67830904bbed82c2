"""Deformable convolution on CPU: blockzoo's compiled sampling against torchvision's op.

The ``deform_conv`` (v1) and ``mdeform_conv`` (v2, with mask) blocks, C -> C, 3x3, with random
offsets (the offset predictor initialised with std 0.1), on the compiled im2col (``blockzoo``)
and on ``torchvision.ops.deform_conv2d`` (``torchvision``: what the blocks ran before, and the
peer), as ratios to a 3x3 conv + BN + ReLU at 8x64x56x56 and 32x256x14x14, 1 and 2 threads,
forward and forward + backward, with peak memory (``_versus_conv.py``); then ``torch.compile``
against eager.

    python benchmarks/bench_deform.py            # the tables in docs/benchmarks.md (< 5 min)
    python benchmarks/bench_deform.py --quick    # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _versus_conv import compile_table, conv_table, header
from torch import nn

import blockzoo as bz


def build(cls: type[nn.Module], impl: str, channels: int) -> nn.Module:
    torch.manual_seed(1)
    block = cls(channels, impl=impl)
    nn.init.normal_(block.offset_conv.weight, std=0.1)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--threads", type=str, default="1,2", help="torch thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compile tables")
    args = parser.parse_args()
    threads = tuple(int(t) for t in args.threads.split(","))
    rounds = 1 if args.quick else args.rounds
    for cls in (bz.DeformConv2d, bz.ModulatedDeformConv2d):
        impls = {
            "blockzoo": (partial(build, cls, "auto"), True),
            "torchvision": (partial(build, cls, "torchvision"), False),
        }
        header(f"{cls.__name__} (C -> C, 3x3)", rounds)
        conv_table(impls, threads, rounds, args.quick)
        if not args.no_compile:
            compile_table(partial(build, cls, "auto"), threads[-1], rounds, args.quick)


if __name__ == "__main__":
    main()
