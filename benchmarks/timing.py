"""Timing shared by the benchmarks: warm-ups, device synchronisation, interleaved rounds, medians.

Variants run interleaved, one call each per round, so that load from other processes on a shared
machine hits them alike; ratios of medians measured in one run are what the tables report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, including the device's queued work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmups: int = 2
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each variant over ``rounds`` interleaved rounds, and the time of
    each variant's first call (allocator, oneDNN primitives, compiling)."""
    first = {name: seconds(call, device) for name, call in calls.items()}
    for _ in range(warmups - 1):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    return {name: statistics.median(values) for name, values in times.items()}, first
