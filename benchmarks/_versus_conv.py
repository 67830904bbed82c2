"""The table the fused-kernel benchmarks share: a block against a plain 3x3 conv + BN + ReLU.

For each map size (default 8x64x56x56 and 32x256x14x14), torch thread count (1 and 2) and pass
(forward in eval mode under ``no_grad``; forward + backward in train mode, gradients for the input
and every parameter), one process times, in interleaved rounds: the block on blockzoo's compiled
kernels (``blockzoo``), the same block on its PyTorch reference form (``before``: what the block
ran before the kernels existed, ``blockzoo.ops.fast_ops(False)``), the peer implementation (the
authors' unfold form, or torchvision's op) and ``nn.Conv2d(C, C, 3) + BN + ReLU``. It prints time
ratios to the conv (the targets are set on these) and peak memory (``peak_bytes``).

Each sample repeats its step for at least ``--sample-s`` seconds (0.2 by default), so a figure is
the steady-state time of the step. A sample of one call measured the page faults that the
previous step left behind (the unfold peer allocates and frees about 0.6-1 GiB per call; the
first call after it re-faults every page it touches): the conv, timed right after the peer, read
up to 1.5 times its steady-state time, and the ratios moved by as much.
``compile_table`` times ``torch.compile`` (inductor) against eager for the blockzoo path;
``parser`` and ``run_tables`` give the three scripts one command line and one sequence.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import Step, cpu_model, peak_bytes, time_interleaved
from torch import nn

from blockzoo import ops

SHAPES = ((8, 64, 56), (32, 256, 14))
QUICK_SHAPES = ((2, 32, 12),)

# name -> (module builder for C channels, whether the compiled kernels are on)
Impls = dict[str, tuple[Callable[[int], nn.Module], bool]]


def conv_bn_relu(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def make_step(module: nn.Module, x: torch.Tensor, fast: bool, train: bool) -> Step:
    """One forward (eval, no_grad) or forward + backward (train) of ``module`` on ``x``."""
    xg = x.clone().requires_grad_(train)

    def step() -> None:
        module.train(train)
        with ops.fast_ops(fast), torch.set_grad_enabled(train):
            y = module(xg)
            if train:
                y.sum().backward()
        if train:
            xg.grad = None
            module.zero_grad(set_to_none=True)

    return step


def parser(description: str, versus_unfold: bool = False,
           compile_tables: bool = True) -> argparse.ArgumentParser:
    """The benchmarks' shared options (``--versus-unfold`` where an older table exists,
    ``--no-compile`` where there are compile tables)."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    result.add_argument("--threads", type=str, default="1,2", help="torch thread counts")
    result.add_argument("--rounds", type=int, default=5)
    result.add_argument("--sample-s", type=float, default=0.2,
                        help="seconds of repeated calls per timed sample (steady state)")
    if compile_tables:
        result.add_argument("--no-compile", action="store_true", help="skip the compile table")
    if versus_unfold:
        result.add_argument("--versus-unfold", action="store_true", help="the older table")
    return result


def thread_counts(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(int(t) for t in args.threads.split(","))


def sampling(args: argparse.Namespace) -> tuple[int, float]:
    """Rounds and seconds per sample: ``--rounds`` and ``--sample-s``, or one one-call round
    with ``--quick``."""
    return (1, 0.0) if args.quick else (args.rounds, args.sample_s)


def run_tables(title: str, impls: Impls, args: argparse.Namespace) -> None:
    """Header, the conv table and (unless ``--no-compile``) the compile table of ``impls``'s
    ``"blockzoo"`` builder."""
    threads, (rounds, sample_s) = thread_counts(args), sampling(args)
    header(title, rounds, sample_s)
    conv_table(impls, threads, rounds, args.quick, sample_s)
    if not args.no_compile:
        compile_table(impls["blockzoo"][0], threads[-1], rounds, args.quick, sample_s)


def header(title: str, rounds: int, sample_s: float) -> None:
    print(f"## {title}\n")
    print(f"torch {torch.__version__}, {cpu_model()}, fast ops: {ops.path_description()}")
    print(f"median of {rounds} interleaved rounds, each sample >= {sample_s:g} s of repeated "
          "calls; ratios are time / time of conv3x3+BN+ReLU; MiB = peak extra memory of one "
          "pass\n")


def conv_table(impls: Impls, threads: tuple[int, ...], rounds: int, quick: bool,
               sample_s: float) -> None:
    """Print the ratio table (see the module docstring)."""
    names = [*impls, "conv"]
    print("| map | pass | threads | conv ms | "
          + " | ".join(f"{name} / conv" for name in names[:-1])
          + " | blockzoo / " + names[1] + " | "
          + " | ".join(f"{name} MiB" for name in names) + " |")
    print("|---" * (4 + 2 * len(names)) + "|")
    for n, c, size in QUICK_SHAPES if quick else SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, size, size)
        modules = {name: build(c) for name, (build, _) in impls.items()}
        modules["conv"] = conv_bn_relu(c)
        fast = {name: flag for name, (_, flag) in impls.items()} | {"conv": False}
        for train in (False, True):
            steps = {name: make_step(modules[name], x, fast[name], train) for name in names}
            torch.set_num_threads(1)
            memory = {name: peak_bytes(step) / 2**20 for name, step in steps.items()}
            for count in threads:
                torch.set_num_threads(count)
                t = time_interleaved(steps, rounds, sample_s)
                ratios = " | ".join(f"{t[name] / t['conv']:.2f}" for name in names[:-1])
                mem = " | ".join(f"{memory[name]:.0f}" for name in names)
                print(f"| {n}x{c}x{size}x{size} | {'fwd+bwd' if train else 'fwd'} | {count} "
                      f"| {t['conv'] * 1e3:.1f} | {ratios} "
                      f"| {t['blockzoo'] / t[names[1]]:.2f} | {mem} |")
    print()


def compile_table(build: Callable[[int], nn.Module], threads: int, rounds: int,
                  quick: bool, sample_s: float) -> None:
    """``torch.compile(block)`` against eager, both on blockzoo's kernels, first map size."""
    n, c, size = (QUICK_SHAPES if quick else SHAPES)[0]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(n, c, size, size)
    block = build(c)
    compiled = torch.compile(block)
    print(f"torch.compile (inductor) vs eager, blockzoo kernels, {n}x{c}x{size}x{size}, "
          f"{threads} thread(s)\n")
    print("| pass | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    for train in (False, True):
        steps = {"eager": make_step(block, x, True, train),
                 "compiled": make_step(compiled, x, True, train)}
        t = time_interleaved(steps, rounds, sample_s)
        print(f"| {'fwd+bwd' if train else 'fwd'} | {t['eager'] * 1e3:.1f} "
              f"| {t['compiled'] * 1e3:.1f} | {t['compiled'] / t['eager']:.2f} |")
    print()
