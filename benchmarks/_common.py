"""Helpers shared by the benchmark scripts: machine description, interleaved timing, memory."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from blockzoo.tools.profile import peak_memory

Step = Callable[[], None]


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def sample_interleaved(
    steps: dict[str, Step], rounds: int, target_s: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of every step in each of ``rounds`` round-robin rounds.

    Load from other processes then hits every step alike; the order of the steps is reversed
    every other round so that none always runs first. Each step runs once as warm-up; with
    ``target_s > 0`` every sample repeats the step enough times to last about ``target_s`` (for
    steps too short to time one by one).
    """
    calls = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        if target_s > 0:
            step()
        calls[name] = max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for r in range(rounds):
        for name, step in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                step()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def time_interleaved(
    steps: dict[str, Step], rounds: int, target_s: float = 0.0
) -> dict[str, float]:
    """Median seconds per call of every step, timed round-robin (see :func:`sample_interleaved`)."""
    samples = sample_interleaved(steps, rounds, target_s)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_bytes(step: Step) -> int:
    """Peak CPU bytes allocated during ``step()`` (``blockzoo.tools.profile.peak_memory``)."""
    return peak_memory(step, torch.device("cpu"))[0]
