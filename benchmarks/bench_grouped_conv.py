"""ACmix's convolution path: the compiled grouped-conv forward against ``F.conv2d`` (oneDNN).

First table: ``blockzoo.ops.grouped_conv2d`` (the compiled kernel) and ``F.conv2d`` on the two
shapes ACmix's fused path runs at the benchmark sizes (4 heads, kernel_conv 3: groups of 12 input
planes and 4 output planes), forward, float32, 1 and 2 torch threads. Second table: the whole
``ACmix`` block forward (C -> C, eval, ``no_grad``) with its grouped convolution on the kernel
(``blockzoo``) or on ``F.conv2d`` (``F.conv2d path``, what the block ran before), as ratios to
``nn.Conv2d(C, C, 3) + BN + ReLU`` (``_versus_conv.conv_bn_relu``). Every sample repeats its
step for about ``--sample-s`` seconds (steady state); the steps of a table run in interleaved
rounds in one process, medians reported.

    python benchmarks/bench_grouped_conv.py              # both tables (about 1 min)
    python benchmarks/bench_grouped_conv.py --quick      # a seconds-long smoke run
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from _common import Step, cpu_model, time_interleaved
from _versus_conv import conv_bn_relu, parser, sampling, thread_counts

import blockzoo as bz
from blockzoo import ops
from blockzoo.ops import grouped_conv

# (N, channels in, H = W, groups): 8x64x56x56 and 32x256x14x14 ACmix blocks' qkv tensors
SHAPES = ((8, 192, 56, 16), (32, 768, 14, 64))
QUICK_SHAPES = ((2, 48, 12, 4),)


def no_grad_step(fn: Callable[..., object], *args: object, onednn: bool = False) -> Step:
    """``fn(*args)`` under ``no_grad`` (with ``grouped_conv2d`` on ``F.conv2d`` if ``onednn``)."""

    def step() -> None:
        with torch.no_grad(), conv_on_onednn() if onednn else contextlib.nullcontext():
            fn(*args)

    return step


@contextlib.contextmanager
def conv_on_onednn() -> Iterator[None]:
    """``grouped_conv2d`` on ``F.conv2d`` inside (the operator's fallback)."""
    previous = grouped_conv._runs_compiled
    grouped_conv._runs_compiled = lambda *args: False
    try:
        yield
    finally:
        grouped_conv._runs_compiled = previous


def op_table(shapes, threads: tuple[int, ...], rounds: int, sample_s: float) -> None:
    print("| qkv (N x C x H x W) -> out | threads | F.conv2d ms | kernel ms "
          "| F.conv2d / kernel |")
    print("|---|---|---|---|---|")
    for n, c, size, groups in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, c, size, size)
        weight = torch.randn(c // 3, 12, 3, 3)
        torch.testing.assert_close(ops.grouped_conv2d(x, weight, 1, 1, groups),
                                   F.conv2d(x, weight, None, 1, 1, 1, groups),
                                   rtol=1e-4, atol=1e-4)
        steps = {"conv2d": no_grad_step(F.conv2d, x, weight, None, 1, 1, 1, groups),
                 "kernel": no_grad_step(ops.grouped_conv2d, x, weight, 1, 1, groups)}
        for count in threads:
            torch.set_num_threads(count)
            t = time_interleaved(steps, rounds, sample_s)
            print(f"| {n}x{c}x{size}x{size} -> {c // 3} | {count} | {t['conv2d'] * 1e3:.2f} "
                  f"| {t['kernel'] * 1e3:.2f} | {t['conv2d'] / t['kernel']:.2f} |")
    print()


def block_table(shapes, threads: tuple[int, ...], rounds: int, sample_s: float) -> None:
    print("| map | threads | conv3x3+BN+ReLU ms | ACmix ms | ACmix (F.conv2d path) ms "
          "| ACmix / conv | ACmix (F.conv2d path) / conv |")
    print("|---|---|---|---|---|---|---|")
    for n, c3, size, _ in shapes:
        c = c3 // 3
        torch.manual_seed(0)
        x = torch.randn(n, c, size, size)
        block, conv = bz.ACmix(c, c).eval(), conv_bn_relu(c).eval()
        steps = {"conv": no_grad_step(conv, x), "block": no_grad_step(block, x),
                 "onednn": no_grad_step(block, x, onednn=True)}
        for count in threads:
            torch.set_num_threads(count)
            t = time_interleaved(steps, rounds, sample_s)
            print(f"| {n}x{c}x{size}x{size} | {count} | {t['conv'] * 1e3:.2f} "
                  f"| {t['block'] * 1e3:.2f} | {t['onednn'] * 1e3:.2f} "
                  f"| {t['block'] / t['conv']:.2f} | {t['onednn'] / t['conv']:.2f} |")
    print()


def main() -> None:
    args = parser(__doc__.split("\n")[0], compile_tables=False).parse_args()
    threads, (rounds, sample_s) = thread_counts(args), sampling(args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"torch {torch.__version__}, {cpu_model()}, fast ops: {ops.path_description()}")
    print(f"forward, float32, median of {rounds} interleaved rounds, each sample >= "
          f"{sample_s:g} s of repeated calls\n")
    op_table(shapes, threads, rounds, sample_s)
    block_table(shapes, threads, rounds, sample_s)


if __name__ == "__main__":
    main()
