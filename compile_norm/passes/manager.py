"""The pass manager: an Inductor ``CustomGraphPass`` running compile_norm's passes in order.

Installed as ``torch._inductor.config.post_grad_custom_post_pass`` by the backend. Every graph
gets fresh pass objects (a run keeps its state on them, so compiles in two threads never share
it). Each pass runs on the live graph after a snapshot is taken; if it raises, the graph is
restored from the snapshot (so a failure leaves that pass's rewrites out, never half of them),
a warning is issued, and compilation goes on: the result is unfused but correct. ``strict``
raises instead.

``uuid()``, the key of Inductor's FX graph cache entries, is a hash of ``state()``, what shapes
the graph the passes make (see cache_key.py): equal states give equal keys, in any process.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..lowerings import choice as lowering_choice
from ..ops import registry
from ..options import PASS_ORDER, CompileOptions, parse_options, thaw_providers

from . import cache_key, cast_guard, results_cache, trace
from .base import GraphPass, PassResult, notify_stage
from .canonicalize import CanonicalizePass
from .gated import GatedPass
from .gemma import GemmaPass
from .lower import LowerPass
from .quant import QuantPass
from .residual import ResidualPass
from .sandwich import SandwichPass

log = logging.getLogger("compile_norm.passes")
PASSES: dict[str, type[GraphPass]] = {
    cls.name: cls for cls in (CanonicalizePass, GemmaPass, GatedPass, ResidualPass, QuantPass,
                              SandwichPass, LowerPass)
}  # run in the order of options.PASS_ORDER


class PassFailedError(RuntimeError):
    """A pass raised while ``strict`` was set."""


def pass_for(name: str) -> type[GraphPass] | None:
    """The pass class named ``name`` (in PASS_ORDER); None for a name no pass has."""
    return PASSES.get(name)


def _snapshot(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    env: dict = {}
    out = copy.graph_copy(graph, env)
    copy.output(out)
    return copy


def replace_graph(graph: torch.fx.Graph, snapshot: torch.fx.Graph) -> None:
    """Make ``graph`` equal to ``snapshot`` (a copy of it, or a graph with the same inputs),
    keeping its own placeholder nodes."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    rest = [n for n in graph.nodes if n.op != "placeholder"]
    for node in rest:  # drop every edge first, so erasing order does not matter
        node.args, node.kwargs = (), {}
    for node in reversed(rest):
        graph.erase_node(node)
    snap_placeholders = [n for n in snapshot.nodes if n.op == "placeholder"]
    env = dict(zip(snap_placeholders, placeholders))
    prev = placeholders[-1] if placeholders else None  # None: append at the end
    for node in snapshot.nodes:
        if node.op != "placeholder":
            with graph.inserting_after(prev):
                prev = env[node] = graph.node_copy(node, lambda n: env[n])


class CompileNormPass(CustomGraphPass):
    """canonicalize, gemma, gated, residual, quant, sandwich, lower — as enabled by the options."""

    def __init__(self, options: CompileOptions | dict | None = None):
        self.options = parse_options(options)

    def priority(self):
        if self.options.providers is None:
            return contextlib.nullcontext()
        return registry.providers_priority(thaw_providers(self.options.providers))

    def __call__(self, graph: torch.fx.Graph) -> None:
        with self.priority():
            cast_guard.restore(graph)  # the casts the joint-graph guard respelled, if any
            notify_stage("input", graph)  # observers (the inspect tool) see every stage
            trace.stage("input", graph)
            results: list[PassResult] = []
            for name in PASS_ORDER:
                if not self.options.enabled(name):
                    continue
                cls = pass_for(name)
                if cls is None:
                    log.debug("compile_norm: pass %s is not available; skipped", name)
                    continue
                result = self.run_pass(cls(), graph)
                result.publish()
                notify_stage(name, graph, result)
                trace.stage(name, graph)
                results.append(result)
            trace.results(results, cached=False)
            results_cache.stamp(results)  # travels with the compiled graph into the caches

    def run_pass(self, graph_pass: GraphPass, graph: torch.fx.Graph) -> PassResult:
        name = graph_pass.name
        snapshot = _snapshot(graph)
        try:
            result = graph_pass.run(graph, self.options)
            graph.lint()
            return result
        except Exception as e:
            if self.options.strict:
                raise PassFailedError(f"compile_norm pass {name!r} failed: {e}") from e
            replace_graph(graph, snapshot)
            return PassResult(name, error=f"{type(e).__name__}: {e}")  # publish() warns

    def uuid(self) -> str:
        return cache_key.hash_state(self.state())

    def state(self) -> tuple:
        """Everything that shapes the graph these passes make. Cheap: the sources are hashed
        once per process, and each distinct state once."""
        with self.priority():
            providers = registry.priority_state()  # the chains as this compile chooses them
        auto = self.options.lowering == "auto"  # then measured kernel choices pick the lowering
        return (
            cache_key.source_hash(),
            self.options.cache_key(),
            providers,
            lowering_choice.state_key() if auto else None,
            torch.__version__,
            cache_key.triton_version(),
        )
