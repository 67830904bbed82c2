"""Helpers shared by the benchmark scripts: machine description, interleaved timing, memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from blockzoo.tools.profile import cpu_model, peak_memory

__all__ = ["Step", "cpu_model", "peak_bytes", "time_interleaved"]

Step = Callable[[], None]


def time_interleaved(
    steps: dict[str, Step], rounds: int, target_s: float = 0.0
) -> dict[str, float]:
    """Median seconds per call of every step, timed round-robin so that load hits them alike.

    Each step runs once as warm-up; with ``target_s > 0`` every sample repeats the step enough
    times to last about ``target_s`` (for steps too short to time one by one).
    """
    calls = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        if target_s > 0:
            step()
        calls[name] = max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                step()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_bytes(step: Step) -> int:
    """Peak CPU bytes allocated during ``step()`` (``blockzoo.tools.profile.peak_memory``)."""
    return peak_memory(step, torch.device("cpu"))[0]
