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

from functools import partial

import torch
from _versus_conv import parser, run_tables
from torch import nn

import blockzoo as bz


def build(cls: type[nn.Module], impl: str, channels: int) -> nn.Module:
    torch.manual_seed(1)
    block = cls(channels, impl=impl)
    nn.init.normal_(block.offset_conv.weight, std=0.1)
    return block


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    for cls in (bz.DeformConv2d, bz.ModulatedDeformConv2d):
        impls = {
            "blockzoo": (partial(build, cls, "auto"), True),
            "torchvision": (partial(build, cls, "torchvision"), False),
        }
        run_tables(f"{cls.__name__} (C -> C, 3x3)", impls, args)


if __name__ == "__main__":
    main()
