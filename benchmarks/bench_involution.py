"""Involution on CPU: blockzoo's compiled kernel, the PyTorch offset accumulation, the unfold form.

Default output (``_versus_conv.py``): the ``Involution`` block (K = 7, 16 channels per group) on
the compiled kernel (``blockzoo``), on the offset accumulation it ran before (``before``) and with
the authors' unfold aggregation (``unfold``), as ratios to a 3x3 conv + BN + ReLU, at
8x64x56x56 and 32x256x14x14, 1 and 2 threads, forward and forward + backward, with peak memory;
then ``torch.compile`` against eager.

    python benchmarks/bench_involution.py            # the tables in docs/benchmarks.md (< 5 min)
    python benchmarks/bench_involution.py --quick    # a seconds-long smoke run
    OMP_NUM_THREADS=1 python benchmarks/bench_involution.py --versus-unfold   # the older table

``--versus-unfold`` prints the older table: forward + backward time and peak memory of the
offset accumulation and the unfold form, measured in the same run, for the operator alone (the
kernel given) and for the whole ``Involution`` block (kernel generation included, shared by
both): batch 8, 64 channels, 56 x 56, K = 7, G = 4, stride 1 and 2.

Peak memory: the allocations and frees that ``torch.profiler`` (``profile_memory=True``) records
on the CPU allocator during one forward + backward, summed in time order; the peak of that running
sum is the extra memory the step needs (output, saved tensors, temporaries and gradients; the
inputs and parameters, allocated before, are not counted).
"""

from __future__ import annotations

import torch
from _common import Step, cpu_model, peak_bytes, time_interleaved
from _versus_conv import parser, run_tables, thread_counts
from torch import nn

import blockzoo as bz
from blockzoo import ops
from blockzoo.blocks.involution import involution2d, involution_unfold_reference


class UnfoldInvolution(nn.Module):
    """The ``Involution`` block with the authors' unfold aggregation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = bz.Involution(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution_unfold_reference(x, self.block.generate_kernel(x), self.block.stride)


def op_steps(n: int, c: int, size: int, k: int, groups: int, stride: int) -> dict[str, Step]:
    out = -(-size // stride)
    x = torch.randn(n, c, size, size, requires_grad=True)
    kernel = torch.randn(n, groups, k, k, out, out, requires_grad=True)
    check = [f(x, kernel, stride) for f in (involution2d, involution_unfold_reference)]
    torch.testing.assert_close(check[0], check[1], rtol=1e-4, atol=1e-4)

    def make(fn) -> Step:
        def step() -> None:
            fn(x, kernel, stride).sum().backward()
            x.grad = kernel.grad = None

        return step

    def accumulation(*args) -> torch.Tensor:
        with ops.fast_ops(False):
            return involution2d(*args)

    return {"offset accumulation": make(accumulation), "unfold": make(involution_unfold_reference)}


def block_steps(n: int, c: int, size: int, k: int, stride: int) -> dict[str, Step]:
    block = bz.Involution(c, stride=stride, kernel_size=k).train()
    x = torch.randn(n, c, size, size, requires_grad=True)

    def unfold_block(inp: torch.Tensor) -> torch.Tensor:
        return involution_unfold_reference(inp, block.generate_kernel(inp), stride)

    def make(fn) -> Step:
        def step() -> None:
            with ops.fast_ops(False):
                fn(x).sum().backward()
            x.grad = None
            block.zero_grad(set_to_none=True)

        return step

    return {"offset accumulation": make(block), "unfold": make(unfold_block)}


def main() -> None:
    args = parser(__doc__.split("\n")[0], versus_unfold=True).parse_args()
    if args.versus_unfold:
        versus_unfold(args.quick, thread_counts(args)[0], args.rounds)
        return
    impls = {
        "blockzoo": (bz.Involution, True),
        "before": (bz.Involution, False),
        "unfold": (UnfoldInvolution, False),
    }
    run_tables("Involution (K=7, 16 channels per group)", impls, args)


def versus_unfold(quick: bool, threads: int, repeats: int) -> None:
    """The older table: offset accumulation against unfold, operator and block, fwd+bwd."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, c, size, k, repeats = (8, 64, 56, 7, repeats) if not quick else (1, 32, 16, 3, 1)
    groups = c // 16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_model()}")
    print(f"N={n}, C={c}, {size}x{size}, K={k}, G={groups}, fwd+bwd, median of {repeats}\n")
    print("| case | stride | time accum. (ms) | time unfold (ms) | time ratio "
          "| peak accum. (MB) | peak unfold (MB) | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for case in ("operator", "block"):
        for stride in (1, 2):
            if case == "operator":
                steps = op_steps(n, c, size, k, groups, stride)
            else:
                steps = block_steps(n, c, size, k, stride)
            t = time_interleaved(steps, repeats)
            m = {name: peak_bytes(step) for name, step in steps.items()}
            ours, ref = "offset accumulation", "unfold"
            print(
                f"| {case} | {stride} | {t[ours] * 1e3:.1f} | {t[ref] * 1e3:.1f} "
                f"| {t[ours] / t[ref]:.2f} | {m[ours] / 2**20:.1f} | {m[ref] / 2**20:.1f} "
                f"| {m[ours] / m[ref]:.3f} |"
            )


if __name__ == "__main__":
    main()
