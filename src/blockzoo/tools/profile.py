"""Measure what a block costs: parameters, FLOPs, latency, peak memory.

Conventions (the same everywhere in blockzoo):

- **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` at the given input size,
  which counts **2 FLOPs per multiply-add** for convolutions and matrix products (so the matmuls
  inside attention count). Work a block does with elementwise ops that the counter cannot see
  (involution's aggregation, ACmix's window attention, deformable bilinear sampling and
  torchvision's deformable op) is added from the block's own ``extra_flops(x)`` hook, in the
  same unit. ``macs = flops / 2``.
- **Latency** is the median over ``repeat`` timed runs after ``warmup`` runs, with the
  interquartile range as spread; wall clock on CPU, CUDA events on GPU.
- **Peak memory** is the CUDA allocator's ``max_memory_allocated`` on GPU; on CPU it is the peak
  of live bytes allocated during the run, replayed from the torch profiler's memory events
  (``profile_memory=True``). Both are measured over one forward (or forward+backward) pass and
  exclude the parameters and the input, which exist before the pass.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from ..core.counting import backward_from_sum, count_flops, count_parameters
from ..registry import block_info, create_block


@dataclass
class ProfileResult:
    """What :func:`profile` measured. Times in milliseconds, memory in bytes."""

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    latency_ms: float
    latency_iqr_ms: float
    peak_memory_bytes: int
    memory_method: str
    device: str
    dtype: str
    backward: bool

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["macs"] = self.macs
        return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device, warmup: int, repeat: int
) -> tuple[float, float]:
    """Median and interquartile range of ``fn``'s run time in milliseconds."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler back end's start/stop lines, written to fd 2 from C++."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated while ``fn`` runs, above what was live before, and the method."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    with _quiet_stderr(), torch_profile(activities=[ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, "torch profiler memory events (CPU)"


def _as_module(module_or_name: nn.Module | str, in_channels: int, **block_kwargs: Any) -> nn.Module:
    if isinstance(module_or_name, str):
        return create_block(module_or_name, in_channels, **block_kwargs)
    if block_kwargs:
        raise ValueError(f"block arguments {sorted(block_kwargs)} need a block name, not a module")
    return module_or_name


def profile(
    module_or_name: nn.Module | str,
    input_size: Sequence[int] = (1, 64, 56, 56),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
    warmup: int = 3,
    repeat: int = 10,
    name: str | None = None,
    **block_kwargs: Any,
) -> ProfileResult:
    """Profile a module, or a registered block built by name for ``input_size``'s channels.

    ``block_kwargs`` (``out_channels``, ``stride``, block options) go to ``create_block``.
    With ``backward=True`` latency, FLOPs and memory cover forward+backward; otherwise the
    forward runs under ``torch.no_grad()``. Half/bfloat16 run the module in that dtype.
    """
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W), got {tuple(input_size)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available here")
    label = name or (module_or_name if isinstance(module_or_name, str)
                     else type(module_or_name).__name__)
    module = _as_module(module_or_name, int(input_size[1]), **block_kwargs)
    module = module.to(device=device, dtype=dtype).train(backward)
    x = torch.randn(*input_size, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(0))
    if backward:
        x.requires_grad_(True)

    def run() -> torch.Tensor:
        if backward:
            out = module(x)
            backward_from_sum(out)
            module.zero_grad(set_to_none=True)
            x.grad = None
            return out
        with torch.no_grad():
            return module(x)

    out = run()
    flops = count_flops(module, x, backward) if backward else _no_grad(count_flops, module, x)
    module.zero_grad(set_to_none=True)
    x.grad = None
    latency, spread = time_fn(run, device, warmup, repeat)
    memory, method = peak_memory(run, device)
    return ProfileResult(
        name=label,
        input_shape=tuple(x.shape),
        output_shape=tuple(out.shape),
        params=count_parameters(module),
        flops=flops,
        latency_ms=latency,
        latency_iqr_ms=spread,
        peak_memory_bytes=memory,
        memory_method=method,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        backward=backward,
    )


def _no_grad(fn: Callable, *args: Any) -> Any:
    with torch.no_grad():
        return fn(*args)


class ConvBNReLU(nn.Sequential):
    """The baseline a conv-kind block replaces: 3x3 conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


BASELINE_CONV = "baseline: conv3x3+bn+relu"
BASELINE_IDENTITY = "baseline: identity"


def compare(
    names: Sequence[str],
    in_channels: int = 64,
    out_channels: int | None = None,
    input_size: tuple[int, int] = (56, 56),
    batch: int = 8,
    stride: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
    warmup: int = 2,
    repeat: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Profile blocks side by side with their baselines; one row per block.

    Every row gives ratios (``*_x``) to the plain 3x3 conv + BN + ReLU with the same in/out
    channels and stride: the layer a conv-kind block replaces, and the natural yardstick for an
    attention block's overhead (ratios to the identity would divide by zero). Tables with an
    attention block also carry an identity row, the floor of the latency. Attention blocks always
    run with ``out_channels = in_channels`` and stride 1; blocks with a fixed stride set
    (``spd_conv``) or a structural width use their own.
    """
    if not names:
        raise ValueError("compare needs at least one block name")
    infos = [block_info(n) for n in names]  # KeyError for unknown names, before any work
    size = (batch, in_channels, *input_size)
    common = dict(input_size=size, device=device, dtype=dtype, backward=backward,
                  warmup=warmup, repeat=repeat)

    def step(label: str) -> None:
        if progress is not None:
            progress(label)

    out = out_channels or in_channels
    baselines: dict[tuple[int, int], ProfileResult] = {}

    def baseline(out_c: int, s: int) -> ProfileResult:
        if (out_c, s) not in baselines:
            step(BASELINE_CONV)
            baselines[out_c, s] = profile(ConvBNReLU(in_channels, out_c, s), name=BASELINE_CONV,
                                          **common)
        return baselines[out_c, s]

    results: list[tuple[ProfileResult, ProfileResult, str]] = []
    for info in infos:
        s = stride if stride in info.strides else info.default_stride
        kwargs: dict[str, Any] = {"stride": s}
        if info.width == "free":
            kwargs["out_channels"] = out
        step(info.name)
        result = profile(info.name, name=info.name, **common, **kwargs)
        results.append((result, baseline(result.output_shape[1], s), info.kind))
    if any(kind == "attention" for _, _, kind in results):
        step(BASELINE_IDENTITY)
        results.append((profile(nn.Identity(), name=BASELINE_IDENTITY, **common),
                        baseline(in_channels, 1), "baseline"))
    rows = [_row(base, "baseline", base) for base in baselines.values()]
    rows += [_row(result, kind, base) for result, base, kind in results]
    return rows


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def _row(result: ProfileResult, kind: str, base: ProfileResult) -> dict[str, Any]:
    return {
        "block": result.name,
        "kind": kind,
        "output": result.output_shape,
        "params": result.params,
        "mflops": round(result.flops / 1e6, 2),
        "latency_ms": round(result.latency_ms, 3),
        "iqr_ms": round(result.latency_iqr_ms, 3),
        "peak_mem_mb": round(result.peak_memory_bytes / 2**20, 2),
        "params_x": _ratio(result.params, base.params),
        "flops_x": _ratio(result.flops, base.flops),
        "latency_x": _ratio(result.latency_ms, base.latency_ms),
        "memory_x": _ratio(result.peak_memory_bytes, base.peak_memory_bytes),
    }
