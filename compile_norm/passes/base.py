"""What every graph pass shares: its result record and how it reports counts.

Each pass is a module in this package with ``NAME`` and ``run(graph, options) -> PassResult``;
``manager.py`` runs them in order on the post-grad FX graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    error: str | None = None

    def skip(self, site: str, reason: str) -> None:
        self.unmatched.append((site, reason))

    def publish(self) -> None:
        """Add the counts to ``torch._dynamo.utils.counters["compile_norm"]`` and log them."""
        group = counters[COUNTER_GROUP]
        group[f"{self.name}_matched"] += self.matched
        group[f"{self.name}_unmatched"] += len(self.unmatched)
        for site, reason in self.unmatched:
            group[f"{self.name}_unmatched: {reason}"] += 1
            log.info("compile_norm %s: left %s unfused: %s", self.name, site, reason)
        if self.matched:
            log.info("compile_norm %s: rewrote %d site(s)", self.name, self.matched)
