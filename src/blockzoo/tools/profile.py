"""Measure what a block or a model costs: parameters, FLOPs, latency, peak memory.

Conventions (the same everywhere in blockzoo; docs/profiling.md says them at length):

- **FLOPs** are 2 per multiply-add: the convolutions and matrix products that
  ``torch.utils.flop_counter.FlopCounterMode`` counts, plus the elementwise multiply-adds on
  feature-map-sized tensors that every block declares through its ``extra_flops(x)`` hook
  (:func:`blockzoo.core.count_flops`). ``macs = flops / 2``.
- **Latency ratios are paired.** :func:`compare` times the baseline and each block in
  alternating rounds in one process (baseline, block, then block, baseline, ...); each round
  gives one ratio, and the table reports the median ratio with a bootstrap 95% interval. Rounds
  go on until that interval lies within ``+-tolerance`` (10%) of the median or the time budget
  per block runs out, and the table says which. Load from other processes hits both members of
  a pair alike, so the ratio survives a busy machine where absolute times do not.
- **Clock**: with one CPU thread (the default, ``threads=1``) a sample is the calling thread's
  CPU time (``time.thread_time``), which leaves out the time other processes hold the core;
  with more threads it is wall-clock time; on CUDA, CUDA events. The output names the clock.
- **Absolute times** (``machine_ms``) are medians of the same samples and depend on the
  machine, its load and the thread count (``threads``, default 1, recorded in the output).
- **Peak memory** is the CUDA allocator's ``max_memory_allocated`` on GPU; on CPU it is the peak
  of live bytes allocated during the run, replayed from the torch profiler's memory events
  (``profile_memory=True``). Both are measured over one forward (or forward+backward) pass and
  exclude the parameters and the input, which exist before the pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from ..core.counting import backward_from_sum, count_flops, count_parameters
from ..core.formatting import format_rows
from ..layers import ConvNormAct
from ..registry import block_info, create_block

DEFAULT_THREADS = 1
"""Threads used for timing unless told otherwise: one thread is the figure least disturbed by
other processes and the same on every machine with at least one free core."""

DEFAULT_BUDGET_S = 5.0
"""Seconds of paired timing per compared block before the rounds stop unconverged."""

TOLERANCE = 0.10
"""Paired rounds stop once the ratio's 95% interval lies within +-10% of its median."""

SAMPLE_MS = 20.0
"""Each timed sample lasts at least about this long: a call shorter than the longer of the
pair, or than this, is repeated within its sample so that both samples of a round last about
as long and span many of the scheduler's time slices alike (load then stretches both)."""

BASELINE_CONV = "baseline: conv3x3+bn+relu"
BASELINE_IDENTITY = "baseline: identity"


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
    threads: int

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["macs"] = self.macs
        return row


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_info(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What every report starts with: CPU model, cores, threads used, torch version, device."""
    device = torch.device(device)
    name = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "device": name,
        "clock": timing_clock(device, threads),
    }


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None or 0: leave torch's setting)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_clock(device: str | torch.device, threads: int | None = None) -> str:
    """``"thread cpu"`` when one CPU thread computes (the calling thread's CPU time, which
    excludes the time other processes hold the core), else ``"wall"``; CUDA uses events."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda events"
    return "thread cpu" if (threads or torch.get_num_threads()) == 1 else "wall"


def _elapsed_ms(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` back-to-back calls (:func:`timing_clock`)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / calls
    clock = time.thread_time if timing_clock(device) == "thread cpu" else time.perf_counter
    t0 = clock()
    for _ in range(calls):
        fn()
    return (clock() - t0) * 1e3 / calls


def time_fn(
    fn: Callable[[], object], device: torch.device, warmup: int, repeat: int
) -> tuple[float, float]:
    """Median and interquartile range of ``fn``'s run time in milliseconds."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = [_elapsed_ms(fn, device, 1) for _ in range(repeat)]
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def median_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap ``confidence`` interval of the median of ``values`` (fixed seed)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, data.size, (resamples, data.size))], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(low), float(high)


@dataclass
class PairedTiming:
    """Alternating samples of a baseline and a candidate (ms per call), one pair per round.

    ``stopped`` is ``"converged"`` (the ratio's interval within the tolerance) or ``"budget"``
    (time ran out first); ``max_load`` the highest 1-minute load average seen during the rounds.
    """

    baseline_ms: list[float] = field(default_factory=list)
    candidate_ms: list[float] = field(default_factory=list)
    stopped: str = "budget"
    max_load: float | None = None

    @property
    def rounds(self) -> int:
        return len(self.candidate_ms)

    @property
    def ratios(self) -> list[float]:
        return [c / b for b, c in zip(self.baseline_ms, self.candidate_ms, strict=True)]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios candidate / baseline."""
        return statistics.median(self.ratios)

    @property
    def interval(self) -> tuple[float, float]:
        """Bootstrap 95% interval of :attr:`ratio`."""
        return median_interval(self.ratios)

    @property
    def spread(self) -> float:
        """Largest distance from the median to an end of the interval, relative to the median."""
        low, high = self.interval
        return max(self.ratio - low, high - self.ratio) / self.ratio


def _calls_per_sample(fns: Sequence[Callable[[], object]], device: torch.device) -> list[int]:
    """Calls per sample that make every sample last about as long as the longest single call
    (and at least :data:`SAMPLE_MS`); single calls timed as the median of three."""
    single = [max(statistics.median(_elapsed_ms(fn, device, 1) for _ in range(3)), 1e-4)
              for fn in fns]
    target = max(SAMPLE_MS, *single)
    return [max(1, round(target / t)) for t in single]


def paired_timing(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    budget_s: float = DEFAULT_BUDGET_S,
    tolerance: float = TOLERANCE,
    max_rounds: int = 10_000,
) -> PairedTiming:
    """Time ``baseline`` and ``candidate`` in alternating rounds until the ratio is known.

    After ``warmup`` calls of each, every round times one sample of each, swapping which goes
    first every round; the shorter call is repeated within its sample so that both samples
    last about as long (:data:`SAMPLE_MS` at least).
    From ``min_rounds`` on, the rounds stop when the bootstrap 95% interval of the median ratio
    lies within ``+-tolerance`` of it (``stopped="converged"``) or once ``budget_s`` seconds
    have passed (``stopped="budget"``).
    """
    device = torch.device(device)
    for _ in range(warmup):
        baseline()
        candidate()
    _synchronize(device)
    calls = _calls_per_sample((baseline, candidate), device)
    timing = PairedTiming(max_load=load_average())
    start = time.perf_counter()
    next_check = min_rounds
    while timing.rounds < max_rounds:
        order = ((0, baseline), (1, candidate))
        sample = [0.0, 0.0]
        for index, fn in order if timing.rounds % 2 == 0 else order[::-1]:
            sample[index] = _elapsed_ms(fn, device, calls[index])
        timing.baseline_ms.append(sample[0])
        timing.candidate_ms.append(sample[1])
        load = load_average()
        if load is not None:
            timing.max_load = max(timing.max_load or 0.0, load)
        if timing.rounds >= next_check:
            if timing.spread <= tolerance:
                timing.stopped = "converged"
                break
            next_check = timing.rounds + max(1, timing.rounds // 10)
        if timing.rounds >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return timing


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


@dataclass
class _Subject:
    """A module ready to be timed: its pass as a closure, and what does not depend on time."""

    name: str
    kind: str
    run: Callable[[], torch.Tensor]
    output_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    params: int
    flops: int
    peak_memory_bytes: int
    memory_method: str


def _subject(
    module: nn.Module,
    name: str,
    kind: str,
    input_size: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    backward: bool,
) -> _Subject:
    """Move ``module`` to ``device``/``dtype``, count its parameters, FLOPs and peak memory."""
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
    if backward:
        flops = count_flops(module, x, backward)
    else:
        with torch.no_grad():
            flops = count_flops(module, x)
    module.zero_grad(set_to_none=True)
    x.grad = None
    memory, method = peak_memory(run, device)
    return _Subject(name, kind, run, tuple(out.shape), tuple(x.shape), count_parameters(module),
                    flops, memory, method)


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available here")
    return device


def profile(
    module_or_name: nn.Module | str,
    input_size: Sequence[int] = (1, 64, 56, 56),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
    warmup: int = 3,
    repeat: int = 10,
    name: str | None = None,
    threads: int | None = DEFAULT_THREADS,
    **block_kwargs: Any,
) -> ProfileResult:
    """Profile a module, or a registered block built by name for ``input_size``'s channels.

    ``block_kwargs`` (``out_channels``, ``stride``, block options) go to ``create_block``.
    With ``backward=True`` latency, FLOPs and memory cover forward+backward; otherwise the
    forward runs under ``torch.no_grad()``. Half/bfloat16 run the module in that dtype.
    Latency is the median (and interquartile range) of ``repeat`` runs with ``threads``
    threads: an absolute, machine-dependent figure; :func:`compare` gives paired ratios.
    """
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W), got {tuple(input_size)}")
    device = _device(device)
    label = name or (module_or_name if isinstance(module_or_name, str)
                     else type(module_or_name).__name__)
    module = _as_module(module_or_name, int(input_size[1]), **block_kwargs)
    with num_threads(threads) as used:
        subject = _subject(module, label, "", input_size, device, dtype, backward)
        latency, spread = time_fn(subject.run, device, warmup, repeat)
    return ProfileResult(
        name=label,
        input_shape=subject.input_shape,
        output_shape=subject.output_shape,
        params=subject.params,
        flops=subject.flops,
        latency_ms=latency,
        latency_iqr_ms=spread,
        peak_memory_bytes=subject.peak_memory_bytes,
        memory_method=subject.memory_method,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        backward=backward,
        threads=used,
    )


def baseline_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """The baseline a conv-kind block replaces: 3x3 conv (no bias) + BatchNorm + ReLU."""
    return ConvNormAct(in_channels, out_channels, 3, stride)


@dataclass
class _Timer:
    """Paired timing options shared by every pair of a comparison."""

    device: torch.device
    warmup: int
    min_rounds: int
    budget_s: float
    tolerance: float

    def pair(self, baseline: _Subject, candidate: _Subject) -> PairedTiming:
        return paired_timing(baseline.run, candidate.run, self.device, warmup=self.warmup,
                             min_rounds=self.min_rounds, budget_s=self.budget_s,
                             tolerance=self.tolerance)


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
    min_rounds: int = 5,
    budget: float = DEFAULT_BUDGET_S,
    threads: int | None = DEFAULT_THREADS,
    tolerance: float = TOLERANCE,
    progress: Callable[[str], None] | None = None,
    identity: bool = True,
    repeat: int | None = None,
) -> list[dict[str, Any]]:
    """Profile blocks side by side with their baselines; one row per block.

    Every row gives ratios (``*_x``) to the plain 3x3 conv + BN + ReLU
    (:class:`blockzoo.layers.ConvNormAct`) with the same in/out channels and stride: the layer
    a conv-kind block replaces, and the natural yardstick for an attention block's overhead
    (ratios to the identity would divide by zero). Tables with an attention block also carry an
    identity row, the floor of the latency. Attention blocks always run with ``out_channels =
    in_channels`` and stride 1; blocks with a fixed stride set (``spd_conv``) or a structural
    width use their own. ``latency_x`` is paired (:func:`paired_timing`, at most ``budget``
    seconds per block, ``threads`` threads); see :func:`report` for the table with its machine.
    ``identity=False`` leaves the identity row out; ``repeat`` is the older name of
    ``min_rounds``.
    """
    if not names:
        raise ValueError("compare needs at least one block name")
    infos = [block_info(n) for n in names]  # KeyError for unknown names, before any work
    device = _device(device)
    size = (batch, in_channels, *input_size)
    timer = _Timer(device, warmup, min_rounds if repeat is None else repeat, budget, tolerance)

    def step(label: str) -> None:
        if progress is not None:
            progress(label)

    def measure(module: nn.Module, name: str, kind: str) -> _Subject:
        return _subject(module, name, kind, size, device, dtype, backward)

    out = out_channels or in_channels
    baselines: dict[tuple[int, int], _Subject] = {}
    with num_threads(threads):

        def baseline(out_c: int, s: int) -> _Subject:
            if (out_c, s) not in baselines:
                baselines[out_c, s] = measure(baseline_conv(in_channels, out_c, s),
                                              BASELINE_CONV, "baseline")
            return baselines[out_c, s]

        pairs: list[tuple[_Subject, _Subject]] = []
        for info in infos:
            s = stride if stride in info.strides else info.default_stride
            kwargs: dict[str, Any] = {"stride": s}
            if info.width == "free":
                kwargs["out_channels"] = out
            step(info.name)
            block = measure(create_block(info.name, in_channels, **kwargs), info.name, info.kind)
            pairs.append((baseline(block.output_shape[1], s), block))
        if identity and any(info.kind == "attention" for info in infos):
            step(BASELINE_IDENTITY)
            pairs.append((baseline(in_channels, 1),
                          measure(nn.Identity(), BASELINE_IDENTITY, "baseline")))
        return _paired_rows(pairs, timer, "mflops", 1e6)


def compare_models(
    models: Sequence[tuple[str, nn.Module]],
    input_size: Sequence[int] = (1, 3, 224, 224),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
    warmup: int = 1,
    min_rounds: int = 5,
    budget: float = DEFAULT_BUDGET_S,
    threads: int | None = DEFAULT_THREADS,
    tolerance: float = TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Whole models side by side: ratios (``*_x``) against the first, paired as in :func:`compare`.

    ``models`` are ``(label, module)`` pairs; each is run on a random ``input_size`` tensor.
    FLOPs are reported in ``gflops``.
    """
    if not models:
        raise ValueError("compare_models needs at least one model")
    device = _device(device)
    timer = _Timer(device, warmup, min_rounds, budget, tolerance)
    with num_threads(threads):
        subjects = []
        for label, module in models:
            if progress is not None:
                progress(label)
            subjects.append(_subject(module, label, "model", input_size, device, dtype,
                                     backward))
        base = subjects[0]
        if len(subjects) == 1:  # timed against itself for its absolute figure
            return _paired_rows([(base, base)], timer, "gflops", 1e9)[:1]
        return _paired_rows([(base, s) for s in subjects[1:]], timer, "gflops", 1e9)


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def _warning(timing: PairedTiming, tolerance: float) -> str:
    notes = []
    if timing.stopped != "converged" and timing.spread > tolerance:
        notes.append(f"wide spread +-{100 * timing.spread:.0f}%")
    cores = os.cpu_count() or 1
    if timing.max_load is not None and timing.max_load > cores:
        notes.append(f"load {timing.max_load:.1f} > {cores} cores")
    return "; ".join(notes)


def _paired_rows(
    pairs: Sequence[tuple[_Subject, _Subject]], timer: _Timer, flops_key: str, flops_unit: float
) -> list[dict[str, Any]]:
    """Time every (baseline, candidate) pair; rows for the baselines first, then candidates."""
    timings = [timer.pair(base, candidate) for base, candidate in pairs]
    bases: dict[int, tuple[_Subject, list[float]]] = {}
    for (base, _), timing in zip(pairs, timings, strict=True):
        bases.setdefault(id(base), (base, []))[1].extend(timing.baseline_ms)
    rows = [_row(base, base, None, statistics.median(samples), flops_key, flops_unit,
                 timer.tolerance) for base, samples in bases.values()]
    rows += [_row(candidate, base, timing, statistics.median(timing.candidate_ms), flops_key,
                  flops_unit, timer.tolerance)
             for (base, candidate), timing in zip(pairs, timings, strict=True)]
    return rows


def _row(
    subject: _Subject,
    base: _Subject,
    timing: PairedTiming | None,
    machine_ms: float,
    flops_key: str,
    flops_unit: float,
    tolerance: float,
) -> dict[str, Any]:
    low, high = timing.interval if timing else (1.0, 1.0)
    return {
        "block" if flops_key == "mflops" else "model": subject.name,
        "kind": subject.kind,
        "output": subject.output_shape,
        "params": subject.params,
        flops_key: round(subject.flops / flops_unit, 3 if flops_key == "gflops" else 2),
        "peak_mem_mb": round(subject.peak_memory_bytes / 2**20, 2),
        "params_x": _ratio(subject.params, base.params),
        "flops_x": _ratio(subject.flops, base.flops),
        "memory_x": _ratio(subject.peak_memory_bytes, base.peak_memory_bytes),
        "latency_x": round(timing.ratio, 3) if timing else 1.0,
        "latency_x_low": round(low, 3),
        "latency_x_high": round(high, 3),
        "rounds": timing.rounds if timing else None,
        "timing": timing.stopped if timing else "",
        "machine_ms": round(machine_ms, 3),
        "warning": _warning(timing, tolerance) if timing else "",
    }


def report_notes(rows: Sequence[dict[str, Any]], tolerance: float = TOLERANCE) -> list[str]:
    """The footnotes under a comparison table: what the timing columns mean, and warnings."""
    notes = [
        "latency_x: median of per-round ratios, baseline and block timed alternately in one "
        "process; latency_x_low/high: its bootstrap 95% interval; timing: 'converged' "
        f"(interval within +-{100 * tolerance:.0f}%) or 'budget' (time ran out first).",
        "machine_ms: median ms per call on this machine with the threads above; "
        "machine-dependent, unlike the ratios and the FLOPs.",
    ]
    warned = [r for r in rows if r.get("warning")]
    if warned:
        names = ", ".join(str(r.get("block", r.get("model"))) for r in warned)
        notes.append(f"WARNING for {names}: see the warning column (a wide spread means the "
                     "ratio is uncertain; a load average above the cores means other processes "
                     "competed for the CPU and its caches: machine_ms is unreliable, the paired "
                     "ratios much less so).")
    return notes


def machine_line(machine: dict[str, Any]) -> str:
    """The one-line form of :func:`machine_info` that tables start with."""
    return (f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} "
            f"thread(s) used, torch {machine['torch']}, device {machine['device']}, "
            f"clock {machine['clock']}")


def report(
    rows: Sequence[dict[str, Any]], machine: dict[str, Any], fmt: str = "table",
    tolerance: float = TOLERANCE,
) -> str:
    """A comparison in ``fmt``; JSON, Markdown and the plain table start with the machine.

    JSON is ``{"machine": ..., "rows": [...], "notes": [...]}``; Markdown and the plain table
    put the machine line first and the notes under the table; CSV is the rows alone.
    """
    if fmt == "json":
        return json.dumps({"machine": machine, "rows": list(rows),
                           "notes": report_notes(rows, tolerance)}, indent=2, default=str)
    table = format_rows(rows, fmt)
    if fmt == "csv":
        return table.rstrip("\n")
    notes = report_notes(rows, tolerance)
    if fmt == "markdown":
        return "\n".join([f"**{machine_line(machine)}**", "", table, "",
                          *[f"- {n}" for n in notes]])
    return "\n".join([machine_line(machine), table, *notes])
