"""Involution: offset accumulation (``involution2d``) against the unfold reference, on CPU.

Forward + backward time and peak memory of both implementations, measured in the same run, for
the operator alone (the kernel given) and for the whole ``Involution`` block (kernel generation
included, shared by both). Default case: batch 8, 64 channels, 56 x 56, K = 7, 16 channels per
group (G = 4), stride 1 and 2.

Peak memory: the allocations and frees that ``torch.profiler`` (``profile_memory=True``) records
on the CPU allocator during one forward + backward, summed in time order; the peak of that running
sum is the extra memory the step needs (output, saved tensors, temporaries and gradients; the
inputs and parameters, allocated before, are not counted).

    OMP_NUM_THREADS=1 python benchmarks/bench_involution.py          # the table in the docs
    python benchmarks/bench_involution.py --quick                    # a seconds-long smoke run
"""

from __future__ import annotations

import argparse

import torch
from _common import Step, cpu_model, peak_bytes, time_interleaved

import blockzoo as bz
from blockzoo.blocks.involution import involution2d, involution_unfold_reference


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

    return {"offset accumulation": make(involution2d), "unfold": make(involution_unfold_reference)}


def block_steps(n: int, c: int, size: int, k: int, stride: int) -> dict[str, Step]:
    block = bz.Involution(c, stride=stride, kernel_size=k).train()
    x = torch.randn(n, c, size, size, requires_grad=True)

    def unfold_block(inp: torch.Tensor) -> torch.Tensor:
        return involution_unfold_reference(inp, block.generate_kernel(inp), stride)

    def make(fn) -> Step:
        def step() -> None:
            fn(x).sum().backward()
            x.grad = None
            block.zero_grad(set_to_none=True)

        return step

    return {"offset accumulation": make(block), "unfold": make(unfold_block)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, size, k, repeats = (8, 64, 56, 7, args.repeats) if not args.quick else (1, 32, 16, 3, 1)
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
