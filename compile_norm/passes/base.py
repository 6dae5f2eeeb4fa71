"""What every graph pass shares: its base class, its result record and how it reports counts.

Each pass is one ``GraphPass`` subclass in a module of this package (``name`` and
``run(graph, options) -> PassResult``); ``manager.py`` runs them in order on the post-grad FX
graph, with fresh instances for every graph.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from torch._dynamo.utils import counters

log = logging.getLogger("compile_norm.passes")

COUNTER_GROUP = "compile_norm"


@dataclass
class PassResult:
    """What one pass did to one graph."""

    name: str
    matched: int = 0
    # (site, reason) for every norm-like site the pass saw but left alone; ``site`` names the
    # node and, where known, the model source line.
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None  # the pass raised: "<type>: <message>"; the graph was restored
    counts: dict[str, int] = field(default_factory=dict)  # further counters, e.g. lower_triton_kernel
    # (node, implementation, why) for every IR node the lower pass replaced: what the inspect
    # report shows beside each lowered node ("generated", "kernel").
    lowered: list[tuple[str, str, str]] = field(default_factory=list)

    def skip(self, site: str, reason: str) -> None:
        self.unmatched.append((site, reason))

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PassResult":
        return cls(d["name"], d["matched"], [tuple(u) for u in d["unmatched"]], d["error"], dict(d["counts"]),
                   [tuple(x) for x in d.get("lowered", ())])

    def publish(self) -> None:
        """Add the counts to ``torch._dynamo.utils.counters["compile_norm"]``, log them and warn
        of a failure. Called for every pass run and for every pass result a compile cache hit
        brings back (``results_cache.py``), so a warm compile reports what the cold one did."""
        group = counters[COUNTER_GROUP]
        group[f"{self.name}_matched"] += self.matched
        group[f"{self.name}_unmatched"] += len(self.unmatched)
        for key, n in self.counts.items():
            group[key] += n
        for site, reason in self.unmatched:
            group[f"{self.name}_unmatched: {reason}"] += 1
            log.info("compile_norm %s: left %s unfused: %s", self.name, site, reason)
        if self.matched:
            log.info("compile_norm %s: rewrote %d site(s)", self.name, self.matched)
        if self.error:
            group[f"{self.name}_failed"] += 1
            message = f"compile_norm pass {self.name!r} failed and was skipped (graph left unfused): {self.error}"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)


class GraphPass:
    """One pass over the post-grad graph. An instance serves one run at a time: the manager
    makes fresh ones for every graph, so what a run keeps on ``self`` is its own even while
    another thread compiles."""

    name: ClassVar[str]

    def run(self, graph: torch.fx.Graph, options: Any) -> PassResult:
        raise NotImplementedError


# Stage observers: the pass manager calls ``notify_stage`` with the post-grad graph before any
# pass (stage "input", result None) and after each pass (its name and PassResult). The
# inspection tool uses this to show the graph before and after every pass.
StageObserver = Callable[[str, torch.fx.Graph, "PassResult | None"], None]
_observers: list[StageObserver] = []


@contextlib.contextmanager
def observe_stages(observer: StageObserver) -> Iterator[None]:
    """Call ``observer(stage, graph, result)`` at every pass stage while the block runs."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def notify_stage(stage: str, graph: torch.fx.Graph, result: PassResult | None = None) -> None:
    for observer in list(_observers):
        observer(stage, graph, result)
