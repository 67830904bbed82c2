"""ACmix on CPU: blockzoo's compiled window attention, the offset loop, the unfold form.

Default output (``_versus_conv.py``): the ``ACmix`` block (C -> C, kernel_att 7, 4 heads) on the
compiled attention (``blockzoo``), on the offset-by-offset loop it ran before (``before``) and
with the authors' unfold attention (``unfold``), as ratios to a 3x3 conv + BN + ReLU at
8x64x56x56 and 32x256x14x14, 1 and 2 threads, forward and forward + backward, with peak memory;
then ``torch.compile`` against eager.

    python benchmarks/bench_acmix.py            # the tables in docs/benchmarks.md (< 5 min)
    python benchmarks/bench_acmix.py --quick    # a seconds-long smoke run
    OMP_NUM_THREADS=1 python benchmarks/bench_acmix.py --versus-unfold   # the older table

``--versus-unfold``: forward + backward time and peak memory of the offset loop and the unfold
attention, measured in the same run, for the attention alone (``local_window_attention`` vs
``acmix_attention_unfold_reference`` on given ``q, k, v, pe``) and for the whole ``ACmix`` block
(projections, position encoding and conv path shared by both). Default case: batch 8, 64 -> 64
channels, 56 x 56, kernel_att 7, 4 heads (head_dim 16), stride 1 and 2.

``--op``: the forward attention operator alone (``window_attention`` on the fused ``qkv``
layout, kernel 7, stride 1, 4 heads) on its 7 x 7 path and on the general sweeps (which other
window sizes, strides and dilations take), as ratios to a 3x3 conv C -> C on the same map (no BN, no
autograd), 1 and 2 threads:

    python benchmarks/bench_acmix.py --op

Peak memory: the running sum of the CPU allocations and frees that ``torch.profiler``
(``profile_memory=True``) records during one forward + backward (``peak_bytes`` in
``_common.py``, shared by the benchmarks); inputs and parameters, allocated before, are not
counted.

    OMP_NUM_THREADS=1 python benchmarks/bench_acmix.py          # the table in the docs
    python benchmarks/bench_acmix.py --quick                    # a seconds-long smoke run
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import Step, cpu_model, peak_bytes, time_interleaved
from _versus_conv import parser, run_tables, thread_counts

import blockzoo as bz
from blockzoo import ops
from blockzoo.blocks import acmix
from blockzoo.blocks.acmix import acmix_attention_unfold_reference, local_window_attention

Attention = Callable[..., torch.Tensor]


class UnfoldACmix(bz.ACmix):
    """The ``ACmix`` block with the authors' unfold attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acmix.local_window_attention = acmix_attention_unfold_reference
        try:
            return super().forward(x)
        finally:
            acmix.local_window_attention = local_window_attention


IMPLS: dict[str, Attention] = {
    "offset loop": local_window_attention,
    "unfold": acmix_attention_unfold_reference,
}


def op_steps(n: int, c: int, size: int, k: int, head: int, stride: int) -> dict[str, Step]:
    d = c // head
    tensors = [torch.randn(n * head, d, size, size) for _ in range(3)]
    q, kk, v = (t.requires_grad_() for t in tensors)
    pe = torch.randn(1, d, size, size, requires_grad=True)
    inputs = (q, kk, v, pe)
    check = [fn(*inputs, k, 1, stride) for fn in IMPLS.values()]
    torch.testing.assert_close(check[0], check[1], rtol=1e-5, atol=1e-5)

    def make(fn: Attention) -> Step:
        def step() -> None:
            with ops.fast_ops(False):
                torch.autograd.grad(fn(*inputs, k, 1, stride).sum(), inputs)

        return step

    return {name: make(fn) for name, fn in IMPLS.items()}


def block_steps(n: int, c: int, size: int, k: int, head: int, stride: int) -> dict[str, Step]:
    block = bz.ACmix(c, c, stride, kernel_att=k, head=head).train()
    x = torch.randn(n, c, size, size, requires_grad=True)
    params = [x, *block.parameters()]

    def make(fn: Attention) -> Step:
        def step() -> None:
            acmix.local_window_attention = fn  # what ACmix.forward calls
            try:
                with ops.fast_ops(False):
                    torch.autograd.grad(block(x).sum(), params)
            finally:
                acmix.local_window_attention = local_window_attention

        return step

    return {name: make(fn) for name, fn in IMPLS.items()}


def operator_steps(n: int, d: int, size: int) -> dict[str, Step]:
    """The forward operator on its 7 x 7 path, on the general sweeps, and a 3x3 conv."""
    from blockzoo.ops.acmix import _run_forward

    torch.manual_seed(0)
    qkv = torch.randn(n, d, 3, 4, size, size)
    pe = torch.randn(d, size, size)
    x = torch.randn(n, 4 * d, size, size)
    conv = torch.nn.Conv2d(4 * d, 4 * d, 3, padding=1, bias=False)

    def attention(rows_of_seven: bool) -> Step:
        def step() -> None:
            out = qkv.new_empty(n, 4, d, size, size)
            _run_forward(qkv, pe, 7, 1, 1, d**-0.5, out, None, rows_of_seven)

        return step

    def conv_step() -> None:
        with torch.no_grad():
            conv(x)

    return {"rows": attention(True), "general": attention(False), "conv": conv_step}


def op_table(threads: tuple[int, ...], rounds: int, quick: bool) -> None:
    """The forward operator's 7 x 7 path and general sweeps against a 3x3 conv (``--op``)."""
    print(f"torch {torch.__version__}, {cpu_model()}; forward window_attention, kernel 7, "
          f"stride 1, 4 heads, median of {rounds} interleaved rounds\n")
    print("| qkv (B, D, 3, heads, H, W) | threads | conv3x3 ms | rows of 7 ms | general ms "
          "| rows of 7 / conv | general / conv | rows of 7 / general |")
    print("|---|---|---|---|---|---|---|---|")
    for n, d, size in [(1, 16, 12)] if quick else [(8, 16, 56), (32, 64, 14)]:
        steps = operator_steps(n, d, size)
        for count in threads:
            torch.set_num_threads(count)
            t = time_interleaved(steps, rounds, target_s=0.05)
            print(f"| ({n}, {d}, 3, 4, {size}, {size}) | {count} | {t['conv'] * 1e3:.1f} "
                  f"| {t['rows'] * 1e3:.1f} | {t['general'] * 1e3:.1f} "
                  f"| {t['rows'] / t['conv']:.2f} | {t['general'] / t['conv']:.2f} "
                  f"| {t['rows'] / t['general']:.2f} |")
    print()


def main() -> None:
    cli = parser(__doc__.split("\n")[0], versus_unfold=True)
    cli.add_argument("--op", action="store_true", help="the forward attention operator alone")
    args = cli.parse_args()
    if args.op:
        op_table(thread_counts(args), 1 if args.quick else max(args.rounds, 7), args.quick)
        return
    if args.versus_unfold:
        versus_unfold(args.quick, thread_counts(args)[0], args.rounds)
        return
    impls = {
        "blockzoo": (bz.ACmix, True),
        "before": (bz.ACmix, False),
        "unfold": (UnfoldACmix, False),
    }
    run_tables("ACmix (C -> C, kernel_att 7, 4 heads)", impls, args)


def versus_unfold(quick: bool, threads: int, repeats: int) -> None:
    """The older table: offset loop against unfold, attention and block, fwd+bwd."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, c, size, k, repeats = (8, 64, 56, 7, repeats) if not quick else (1, 16, 12, 3, 1)
    head = 4

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_model()}")
    print(f"N={n}, C={c}, {size}x{size}, kernel_att={k}, head={head}, fwd+bwd, "
          f"median of {repeats}\n")
    print("| case | stride | time loop (ms) | time unfold (ms) | time ratio "
          "| peak loop (MB) | peak unfold (MB) | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ours, ref = IMPLS
    for case, build in (("attention", op_steps), ("block", block_steps)):
        for stride in (1, 2):
            steps = build(n, c, size, k, head, stride)
            t = time_interleaved(steps, repeats)
            m = {name: peak_bytes(step) for name, step in steps.items()}
            print(
                f"| {case} | {stride} | {t[ours] * 1e3:.1f} | {t[ref] * 1e3:.1f} "
                f"| {t[ours] / t[ref]:.2f} | {m[ours] / 2**20:.1f} | {m[ref] / 2**20:.1f} "
                f"| {m[ours] / m[ref]:.3f} |"
            )


if __name__ == "__main__":
    main()
