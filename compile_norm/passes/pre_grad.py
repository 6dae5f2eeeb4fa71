"""Training graphs: the norms become compile_norm ops before AOTAutograd differentiates them.

In a graph that needs gradients, AOTAutograd traces the backward and saves the hand-written
norm's ``rsqrt`` for it, so after autograd the post-grad canonicalize no longer sees a norm.
This pass runs first, as Inductor's ``pre_grad_custom_pass`` on the Dynamo graph, and only when
the graph needs gradients (grad mode on and an input requiring grad, AOTAutograd's own test):
inference graphs and ``torch.no_grad()`` calls are left exactly as they were.

It re-traces the Dynamo graph (torch IR) into ATen with ``make_fx(pre_dispatch=True)``, which
keeps grad-mode and autocast regions as graph nodes, decomposing only the ATen spellings of a
cast or a library norm (``aten.to``, ``type_as``, ``rms_norm``, ``contiguous``) into what the
post-grad passes know. Then canonicalize, gemma, residual and sandwich run on it unchanged
(the same matcher, so the same numerics contract), and when any norm matched the Dynamo graph is
replaced by the re-traced one. AOTAutograd then differentiates ``rms_norm`` /
``fused_add_rms_norm`` / ``rms_norm_add_rms_norm`` by their own autograd formulas, so the backward graph holds
``rms_norm_backward``. Custom autograd.Functions and higher-order ops are copied into the
re-trace as single opaque nodes (``_is_opaque``): their own backward still runs. When nothing
matched, or the re-trace or a pass fails, the Dynamo graph is kept as it was (a failure is
counted as ``pre_grad_unmatched: <reason>``; ``strict`` raises instead).

Counters: ``pre_grad_<pass>_matched`` / ``_unmatched`` for canonicalize, gemma, residual,
sandwich.
Stage observers (``base.observe_stages``, the inspect tool) see ``pre_grad_input`` (the
re-trace) and ``pre_grad_<pass>`` after each pass; a graph kept before any pass ran is seen
as ``pre_grad_input`` (Dynamo's graph) and a ``pre_grad`` stage carrying the reason as its error.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..options import CompileOptions, parse_options
from . import cache_key
from .base import COUNTER_GROUP, PassResult, notify_stage
from .canonicalize import CanonicalizePass
from .gemma import GemmaPass
from .residual import ResidualPass
from .sandwich import SandwichPass

log = logging.getLogger("compile_norm.passes")
PREFIX = "pre_grad"
INPUT_STAGE = f"{PREFIX}_input"  # the stage observers see first: the re-traced graph, no pass yet
# The passes that make the float ops (the ops with an autograd formula); quant and lower wait
# for the post-grad graph.
PASSES = (CanonicalizePass, GemmaPass, ResidualPass, SandwichPass)
_CONSTANT_IDS = itertools.count()


def _decomposed() -> dict[Any, Any]:
    """The composite ops decomposed while re-tracing: the spellings of a cast, a clone and a
    library norm that the post-grad graph holds in their decomposed form."""
    aten = torch.ops.aten
    table = {}
    for packet in (aten.to, aten.type_as, aten.contiguous, getattr(aten, "rms_norm", None)):
        if packet is None:
            continue
        for name in packet.overloads():
            op = getattr(packet, name)
            table[op] = op.decompose
    return table


def example_values(graph: torch.fx.Graph) -> list[Any] | None:
    """What Dynamo recorded for each graph input (None where an input has no record)."""
    values = []
    for node in graph.find_nodes(op="placeholder"):
        if "example_value" not in node.meta:
            return None
        values.append(node.meta["example_value"])
    return values


def needs_grad(values: list[Any]) -> bool:
    """AOTAutograd's test for building a backward: grad mode on and an input requiring grad."""
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _is_opaque(node: torch.fx.Node) -> bool:
    """A call the re-trace copies as it is instead of tracing into: a custom
    ``torch.autograd.Function`` (Dynamo's ``trampoline_autograd_apply`` or the
    ``autograd_function_apply`` higher-order op: tracing into it would record its forward ops
    only, and AOTAutograd would differentiate those instead of calling its backward) and every
    other higher-order op (activation checkpointing, autocast / grad-mode wrappers, ...: their
    subgraphs carry meaning that inlining would drop)."""
    if node.op != "call_function" or "example_value" not in node.meta:
        return False
    target = node.target
    return (getattr(target, "__name__", "") == "trampoline_autograd_apply"
            or isinstance(target, torch._ops.HigherOrderOperator))


class _Retracer(torch.fx.Interpreter):
    """Runs the Dynamo graph under ``make_fx``, copying opaque calls (``_is_opaque``) as
    single nodes."""

    def run_node(self, node: torch.fx.Node) -> Any:
        if not _is_opaque(node):
            return super().run_node(node)
        from torch.fx.experimental.proxy_tensor import get_proxy_mode, track_tensor_tree

        tracer = get_proxy_mode().tracer
        args, kwargs = self.fetch_args_kwargs_from_env(node)

        def proxy(value: Any) -> Any:
            if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
                return tracer.unwrap_proxy(value)
            if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
                return value
            # a subgraph or a config object: an attribute of the traced module
            name = f"_compile_norm_object_{next(_CONSTANT_IDS)}"
            setattr(tracer.root, name, value)
            return tracer.create_proxy("get_attr", name, (), {})

        out = tracer.create_proxy("call_function", node.target,
                                  *torch.utils._pytree.tree_map(proxy, (args, kwargs)))
        out.node.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        # Dynamo's fake output (the trace runs in Dynamo's fake mode) stands for the result.
        return track_tensor_tree(node.meta["example_value"], out, constant=None, tracer=tracer)


def retrace(gm: torch.fx.GraphModule, values: list[Any]) -> torch.fx.GraphModule:
    """``gm`` as a pre-dispatch ATen graph, traced on its fake example values, node metadata
    (source lines, module stack) kept."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.traceback import preserve_node_meta

    fake = next(v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor))
    with preserve_node_meta(), fake, torch._guards.tracing(None):
        return make_fx(lambda *args: _Retracer(gm).run(*args), pre_dispatch=True,
                       decomposition_table=_decomposed())(*values)


def _adopt_constants(traced: torch.fx.GraphModule, owner: torch.fx.GraphModule) -> None:
    """Move the traced graph's constant attributes (``get_attr`` targets) onto ``owner``."""
    for node in traced.graph.find_nodes(op="get_attr"):
        name = f"_compile_norm_constant_{next(_CONSTANT_IDS)}"
        setattr(owner, name, getattr(traced, node.target))
        node.target = name


class PreGradPass(CustomGraphPass):
    """Inductor's ``pre_grad_custom_pass``: canonicalize, gemma, residual, sandwich on the ATen
    form of a graph that needs gradients (as enabled by the options)."""

    def __init__(self, options: CompileOptions | dict | None = None):
        self.options = parse_options(options)

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .manager import CompileNormPass, replace_graph

        values = example_values(graph)
        if values is None or not needs_grad(values):
            return  # inference: the post-grad passes do it all
        enabled = [cls for cls in PASSES if self.options.enabled(cls.name)]
        if CanonicalizePass not in enabled:
            return
        if not any(isinstance(v, torch._subclasses.FakeTensor) for v in values):
            return self._keep("graph inputs have no fake example values", graph)
        try:
            traced = retrace(graph.owning_module, values)
        except Exception as e:
            if self.options.strict:
                raise
            return self._keep(f"re-tracing to ATen failed ({type(e).__name__})", graph, e)
        manager = CompileNormPass(self.options)
        results = []
        notify_stage(INPUT_STAGE, traced.graph)  # observers (the inspect tool) see every stage
        # No tracing context while the passes build nodes: its fake mode is the backend's
        # (AOTAutograd's inputs), the traced graph's values are in Dynamo's (its inputs' own).
        with manager.priority(), torch._guards.tracing(None):
            for cls in enabled:
                result = manager.run_pass(cls(), traced.graph)  # strict: raises
                result.name = f"{PREFIX}_{cls.name}"
                notify_stage(result.name, traced.graph, result)
                results.append(result)
        failed = [r.name for r in results if r.error]
        if failed:  # the post-grad passes get the graph as Dynamo made it
            return self._keep(f"pass {failed[0]} failed")  # its stage shows the error
        for result in results:
            result.publish()
        if not results[0].matched:
            return  # no norm: keep Dynamo's graph as it was
        _adopt_constants(traced, graph.owning_module)
        replace_graph(graph, traced.graph)

    def _keep(self, reason: str, graph: torch.fx.Graph | None = None,
              error: Exception | None = None) -> None:
        """Leave the graph to the post-grad passes, counted; with ``graph`` (Dynamo's, nothing
        re-traced), observers see it as a pre-grad stage that failed, with the reason."""
        if graph is not None:
            notify_stage(INPUT_STAGE, graph)
            notify_stage(PREFIX, graph, PassResult(PREFIX, error=reason + (f": {error}" if error else "")))
        counters[COUNTER_GROUP][f"{PREFIX}_unmatched: {reason}"] += 1
        log.warning("compile_norm %s: training graph left to the post-grad passes: %s%s",
                    PREFIX, reason, f": {error}" if error else "")

    def uuid(self) -> str:
        from .manager import CompileNormPass

        return cache_key.hash_state((PREFIX, CompileNormPass(self.options).state()))


__all__ = ["PreGradPass", "needs_grad", "retrace"]
