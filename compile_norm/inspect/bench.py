"""Wall-clock time of one call: median of repeats, synchronized on CUDA.

This is a quick side-by-side for the inspection report, not the benchmark suite (that one
replays CUDA graphs with L2 flushed; see BENCHMARKS.md). It includes Python and launch overhead.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Bench:
    device: str
    repeats: int
    calls_per_repeat: int
    backend_us: float
    stock_us: float
    eager_us: float

    @property
    def speedup(self) -> float:
        """stock torch.compile time / backend time (> 1: the backend is faster)."""
        return self.stock_us / self.backend_us if self.backend_us else float("nan")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calls_per_repeat(fn: Callable[[], object], device: str, target_s: float = 2e-3) -> int:
    """How many calls make one repeat last about ``target_s`` (small calls are too noisy)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(100, int(target_s / one)))


def median_us(fn: Callable[[], object], device: str, repeats: int, inner: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e6
