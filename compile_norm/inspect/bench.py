"""Wall-clock time of one call per candidate: interleaved repeats, median and spread,
synchronized on CUDA.

This is a quick side-by-side for the inspection report, not the benchmark suite (that one
replays CUDA graphs with L2 flushed; see BENCHMARKS.md). It includes Python and launch overhead.
The candidates take turns within every repeat (who goes first rotates), so a busy machine
slows them alike instead of whichever happened to run during the burst; the spread (25th to
75th percentile) says how far to trust the ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Bench:
    device: str
    repeats: int
    calls_per_repeat: int
    backend_us: float  # medians
    stock_us: float
    eager_us: float
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (p25, p75) us
    what: str = "call"  # what one timed call does: "call", "training step (forward + backward)"

    @property
    def speedup(self) -> float:
        """stock torch.compile time / backend time (> 1: the backend is faster)."""
        return self.stock_us / self.backend_us if self.backend_us else float("nan")

    @property
    def expectation(self) -> str:
        """What the ratio should be on this device, so that a 0.9x or 1.1x is read right."""
        if self.device.startswith("cuda"):
            return ("on CUDA the quantizing norms gain most (one kernel where stock "
                    "torch.compile makes several); plain norms match stock torch.compile")
        return ("on a CPU expect parity with stock torch.compile (about 1x): both generate the "
                "same fused C++ loops; compile_norm's kernels are for CUDA")

    def describe(self, name: str, median: float) -> str:
        lo, hi = self.spread.get(name, (median, median))
        return f"{median:.1f} us [{lo:.1f}-{hi:.1f}]" if name in self.spread else f"{median:.1f} us"


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


def interleaved_us(fns: dict[str, Callable[[], object]], device: str, repeats: int, inner: int,
                   warmup: int = 3) -> dict[str, list[float]]:
    """Per candidate, the time of one call (us) in each of ``repeats`` rounds; in every round
    each candidate runs ``inner`` calls, the first candidate rotating from round to round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner * 1e6)
    return times


def median_and_spread(times: list[float]) -> tuple[float, tuple[float, float]]:
    """(median, (25th, 75th percentile))."""
    if len(times) < 2:
        return times[0], (times[0], times[0])
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), (q1, q3)
