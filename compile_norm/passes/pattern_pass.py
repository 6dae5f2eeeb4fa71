"""A pass made of Inductor pattern-matcher entries (gemma, residual, quant, lower).

Its own file, not base.py: base.py is imported by the inspect tool, which should not pay for
importing the pattern matcher.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from torch._inductor.pattern_matcher import Match, PatternExpr, PatternMatcherPass, register_graph_pattern

from .base import GraphPass, PassResult

PatternEntry = tuple[PatternExpr, Callable[[Match], bool], Callable[..., None]]


class PatternPass(GraphPass):
    """A pass of Inductor pattern-matcher entries whose checks and rewrites are this
    instance's methods: they read the current run's ``result`` and ``options`` from ``self``."""

    def __init__(self) -> None:
        self.result: PassResult | None = None
        self.options: Any = None
        self.patterns = PatternMatcherPass(pass_name=f"compile_norm_{self.name}")
        for pattern, check, rewrite in self.entries():
            register_graph_pattern(pattern, extra_check=check, pass_dict=self.patterns)(rewrite)

    def entries(self) -> Iterable[PatternEntry]:
        """``(pattern, check, rewrite)`` of every pattern, in the order they are tried."""
        raise NotImplementedError

    @contextlib.contextmanager
    def running(self, options: Any) -> Iterator[PassResult]:
        """The run's result (and ``options``) on ``self`` while the block runs."""
        if self.result is not None:
            raise RuntimeError(f"compile_norm pass {self.name!r} is already running: use one instance per run")
        self.result, self.options = PassResult(self.name), options
        try:
            yield self.result
        finally:
            self.result = self.options = None
