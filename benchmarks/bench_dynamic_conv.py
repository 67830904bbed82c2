"""Speed and peak memory of DynamicConv2d and CondConv2d against nn.Conv2d and a per-sample loop.

For every batch (1, 8, 32), map size (56 and 28, the target sizes, and 14 to show where the loop's
per-sample overhead starts to count) and pass (forward, forward+backward), 64 -> 64 channels,
3x3, float32 on CPU, it times in the same interleaved rounds:

- ``conv``: ``nn.Conv2d(64, 64, 3, padding=1)``, the layer the dynamic convolutions replace;
- ``dy`` / ``cond``: ``DynamicConv2d`` (K=4) / ``CondConv2d`` (E=8), ``strategy="auto"``;
- ``dy_loop`` / ``cond_loop``: the same layers (same routing, same parameters) computed the
  popular way, a Python loop over samples with one ``F.conv2d`` each (:func:`per_sample_loop`).

Forward passes run under ``torch.no_grad()`` in eval mode; forward+backward passes in train
mode with ``y.sum().backward()`` (parameter gradients reset before each pass). Times are the
median over interleaved rounds, so the ratios compare runs taken at the same moment. Peak memory
is the peak of live bytes allocated during one pass above what existed before it (input and
parameters excluded), replayed from the torch profiler's CPU memory events
(``blockzoo.tools.profile.peak_memory``). Targets (issue 7, at batch 32): forward time at most
1.5x ``nn.Conv2d``, at least 3x faster than the per-sample loop, peak memory at most 2x
``nn.Conv2d``'s.

``dy loop / conv`` bounds the reachable speed-up over the loop: a dynamic convolution does at
least the arithmetic of one convolution of the same shape, so unless an implementation beats
``nn.Conv2d`` itself, it cannot be faster than the loop by more than the loop is slower than
``nn.Conv2d``.

    OMP_NUM_THREADS=1 python benchmarks/bench_dynamic_conv.py           # the full table (~2.5 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_dynamic_conv.py --quick   # a smoke run (seconds)
    python benchmarks/bench_dynamic_conv.py --threads 2                 # two torch threads
    python benchmarks/bench_dynamic_conv.py --device cuda               # the table on a GPU

On CUDA every timed pass ends with ``torch.cuda.synchronize()`` and memory is CUDA's
``max_memory_allocated``; ``--strategies`` measures on the CPU only.

``--strategies`` prints instead the measurements behind ``strategy="auto"``: the time of
DynamicConv2d (K=4) with ``strategy="mix"`` divided by its time with ``"aggregate"`` over
channels, map sizes, batches and kernel sizes, next to the strategy "auto" picks (~3 min).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import cpu_model, time_interleaved
from torch import nn

import blockzoo as bz
from blockzoo.blocks.dynamic import ExpertConv2d
from blockzoo.tools.profile import peak_memory

IMPLS = ("conv", "dy", "cond", "dy_loop", "cond_loop")


def per_sample_loop(block: ExpertConv2d, x: torch.Tensor) -> torch.Tensor:
    """The baseline: the block's routing, then per sample its kernel and one ``F.conv2d``."""
    routing = block.routing(x)
    experts = block.weight.reshape(block.num_experts, -1)
    outputs = []
    for n in range(x.shape[0]):
        kernel = (routing[n] @ experts).reshape(block.out_channels, *block.weight.shape[1:])
        bias = None if block.bias is None else routing[n] @ block.bias
        outputs.append(F.conv2d(x[n : n + 1], kernel, bias, block.stride, block.padding,
                                block.dilation, block.groups))
    return torch.cat(outputs)


def make_step(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
              backward: bool) -> Callable[[], None]:
    """One pass: forward under no_grad in eval mode, or forward+backward in train mode.

    On CUDA the pass waits for the device, so that wall-clock timing sees the whole pass."""
    module.train(backward)

    def wait() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def forward() -> None:
        with torch.no_grad():
            fn(x)
        wait()

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        fn(x).sum().backward()
        wait()

    return forward_backward if backward else forward


def measure(batch: int, size: int, backward: bool, rounds: int, target_s: float,
            device: torch.device) -> tuple[dict[str, float], dict[str, int], str]:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, device=device)
    dy = bz.DynamicConv2d(64, 64, device=device)
    cond = bz.CondConv2d(64, 64, device=device)
    for block in (dy, cond):  # spread the routing: the loop must equal the block
        nn.init.normal_(block.bias)
    x = torch.randn(batch, 64, size, size, device=device)
    with torch.no_grad():
        for block in (dy, cond):
            torch.testing.assert_close(per_sample_loop(block, x), block(x), rtol=1e-3,
                                       atol=1e-3)
    fns = {
        "conv": (conv, conv),
        "dy": (dy, dy),
        "cond": (cond, cond),
        "dy_loop": (lambda t: per_sample_loop(dy, t), dy),
        "cond_loop": (lambda t: per_sample_loop(cond, t), cond),
    }
    steps = {name: make_step(fn, module, x, backward) for name, (fn, module) in fns.items()}
    times = time_interleaved(steps, rounds, target_s)
    memory = {name: peak_memory(step, x.device)[0] for name, step in steps.items()}
    return times, memory, dy.choose_strategy(x)


def compare_strategies(rounds: int, target_s: float) -> None:
    """Print mix / aggregate time ratios and the strategy ``"auto"`` picks."""
    print("| channels | map | batch | kernel | fwd: mix / aggregate | fwd+bwd: mix / aggregate "
          "| auto picks |")
    print("|---|---|---|---|---|---|---|")
    for channels in (64, 256):
        for size in (7, 14, 28):
            for batch in (8, 32):
                for k in (1, 3):
                    torch.manual_seed(0)
                    block = bz.DynamicConv2d(channels, kernel_size=k)
                    x = torch.randn(batch, channels, size, size)
                    ratios = []
                    for backward in (False, True):
                        steps = {}
                        for strategy in ("aggregate", "mix"):
                            block_s = copy.deepcopy(block)
                            block_s.strategy = strategy
                            steps[strategy] = make_step(block_s, block_s, x, backward)
                        t = time_interleaved(steps, rounds, target_s)
                        ratios.append(t["mix"] / t["aggregate"])
                    print(f"| {channels} | {size}x{size} | {batch} | {k}x{k} | {ratios[0]:.2f} | "
                          f"{ratios[1]:.2f} | {block.choose_strategy(x)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 1 and 8, 28x28")
    parser.add_argument("--strategies", action="store_true",
                        help="measure the aggregate and mix strategies behind strategy='auto'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if device.type == "cuda" and args.strategies:
        parser.error("--strategies measures the CPU rule; run it without --device")
    batches, sizes = ((1, 8), (28,)) if args.quick else ((1, 8, 32), (56, 28, 14))
    rounds, target_s = (3, 0.01) if args.quick else (11, 0.08)

    machine = f"{torch.get_num_threads()} thread(s), CPU: {cpu_model()}"
    if device.type == "cuda":
        machine += f", GPU: {torch.cuda.get_device_name(device)}"
    print(f"torch {torch.__version__}, {machine}\n")
    if args.strategies:
        compare_strategies(rounds=5, target_s=0.05)
        return
    print("| batch | map | pass | strategy | conv ms | dy / conv | cond / conv | "
          "dy loop / dy | cond loop / cond | dy loop / conv | conv MiB | dy mem / conv | "
          "cond mem / conv | dy loop mem / conv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for batch in batches:
        for size in sizes:
            for backward in (False, True):
                t, m, strategy = measure(batch, size, backward, rounds, target_s, device)
                results[batch, size, backward] = t, m
                print(
                    f"| {batch} | {size}x{size} | {'fwd+bwd' if backward else 'fwd'} | "
                    f"{strategy} | {t['conv'] * 1e3:.2f} | {t['dy'] / t['conv']:.2f} | "
                    f"{t['cond'] / t['conv']:.2f} | {t['dy_loop'] / t['dy']:.2f} | "
                    f"{t['cond_loop'] / t['cond']:.2f} | {t['dy_loop'] / t['conv']:.2f} | "
                    f"{m['conv'] / 2**20:.1f} | "
                    f"{m['dy'] / m['conv']:.2f} | {m['cond'] / m['conv']:.2f} | "
                    f"{m['dy_loop'] / m['conv']:.2f} |",
                    flush=True,
                )
    largest = max(batches)
    print(f"\nTargets at batch {largest}:")
    for (batch, size, backward), (t, m) in results.items():
        if batch != largest:
            continue
        label = f"{size}x{size} {'fwd+bwd' if backward else 'fwd'}"
        for block in ("dy", "cond"):
            checks = [f"speed-up over loop {t[block + '_loop'] / t[block]:.2f}x (>= 3: "
                      f"{'met' if t[block + '_loop'] / t[block] >= 3 else 'MISSED'})",
                      f"memory {m[block] / m['conv']:.2f}x conv (<= 2: "
                      f"{'met' if m[block] / m['conv'] <= 2 else 'MISSED'})"]
            if not backward:
                ratio = t[block] / t["conv"]
                checks.insert(0, f"time {ratio:.2f}x conv (<= 1.5: "
                                 f"{'met' if ratio <= 1.5 else 'MISSED'})")
            print(f"- {label} {block}: " + "; ".join(checks))
        print(f"- {label} bound: the loop takes {t['dy_loop'] / t['conv']:.2f}x nn.Conv2d's time")


if __name__ == "__main__":
    main()
