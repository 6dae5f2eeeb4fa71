"""Lower pass: every remaining compile_norm IR node becomes its implementation.

``generated`` mode (default): the node is replaced by its reference decomposition, traced on
the node's fake tensors and inlined, so Inductor fuses it with its neighbours into generated
kernels. ``kernel`` mode: a node is kept as a call to the op only where a registered kernel
(a non-native provider that is supported here and accepts the node's fake tensors) would run
it; the Triton ``triton_op`` wrapping that makes such a call visible to Inductor comes from the
kernels work. Nodes no kernel accepts are inlined as in ``generated`` mode, because an opaque
call of the native reference would only be slower. Where that kernel is the Triton one and
``compile_norm.kernels.library_ops`` is available, the node becomes the functional graph of the
``compile_norm_kernels`` triton_op's implementation (a user-defined Triton kernel Inductor
sees and schedules, not an opaque call). ``auto`` mode: ``lowerings.choice.choose`` picks
``kernel`` (as just described) or ``generated`` per node.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from ..lowerings import choice as lowering_choice
from ..lowerings import reference_for
from ..ops import registry
from . import patterns as P
from .base import COUNTER_GROUP, PassResult
from .pattern_pass import PatternPass

log = logging.getLogger("compile_norm.passes")
TRITON = "triton"  # the provider whose kernel library_ops exposes
KERNEL_COUNTER = "lower_triton_kernel"


def kernel_for(node: torch.fx.Node) -> str | None:
    """The non-native provider that would run ``node``, judged from its fake tensors."""
    name = P.op_name(node)
    args = [P.val(a) if isinstance(a, torch.fx.Node) else a for a in P.norm_args(node)]
    for provider in registry.chain(name):
        if provider.name == registry.NATIVE:
            return None
        try:
            if provider.supports(*args):
                return provider.name
        except Exception:  # a supports() that cannot judge fake tensors: do not pick it
            continue
    return None


def _fake_args(node: torch.fx.Node) -> list:
    return [P.val(a) if isinstance(a, torch.fx.Node) else a for a in P.norm_args(node)]


def _trace_kernel(node: torch.fx.Node):
    """(functional graph of the triton_op implementation, "") or (None, why not)."""
    from ..kernels import library_ops

    if not library_ops.AVAILABLE:
        return None, library_ops.REASON
    args = P.norm_args(node)
    mode = P._fake_mode(tuple(args))
    try:
        with mode if mode is not None else contextlib.nullcontext():
            gm = library_ops.functional_trace(library_ops.functions()[P.op_name(node)], _fake_args(node))
    except Exception as e:  # e.g. a shape the launch code cannot trace: inline instead
        return None, f"tracing the kernel failed ({type(e).__name__}: {e})"
    if any(n.target is torch.ops.aten.copy_.default for n in gm.graph.nodes):
        # Triton's mutation analysis failed (it assumed every argument is written)
        return None, "kernel mutation analysis failed"
    return gm, ""


class LowerPass(PatternPass):
    name = "lower"

    def __init__(self) -> None:
        super().__init__()
        self._traced: dict[torch.fx.Node, torch.fx.GraphModule] = {}  # kernel graphs _check traced

    def entries(self):
        for name in registry.ops():
            yield CallFunctionVarArgs(P.overload(name)), self._check, self._inline

    def _check(self, match: Match) -> bool:
        node = match.output_node()
        result, options = self.result, self.options
        if options.lowering == "generated":
            return True
        provider = kernel_for(node)
        if provider is None:
            return True
        if options.lowering == "auto":
            if provider != TRITON:  # the table knows only the Triton kernel
                return True
            choice, why = lowering_choice.explain(P.op_name(node), _fake_args(node))
            log.debug("compile_norm lower (auto): %s -> %s (%s)", P.site(node), choice, why)
            if choice == lowering_choice.GENERATED:
                return True
        why = ""
        if provider == TRITON:
            traced, why = _trace_kernel(node)
            if traced is not None:
                self._traced[node] = traced
                return True  # _inline puts the traced kernel graph in
            if options.lowering == "auto":  # inline rather than an opaque call
                log.info("compile_norm lower: %s inlined, kernel unusable: %s", P.site(node), why)
                return True
        result.skip(P.site(node), f"kept as a call to kernel {provider!r}" + (f" ({why})" if why else ""))
        return False

    def _inline(self, match: Match, *args, **kwargs) -> None:
        node = match.output_node()
        traced = self._traced.pop(node, None)
        if traced is not None:
            match.replace_by_example(traced, P.norm_args(node), trace_fn=lambda gm, _args: gm)
            counters[COUNTER_GROUP][KERNEL_COUNTER] += 1  # lowered (matched), to the kernel
        else:
            match.replace_by_example(reference_for(node.target), P.norm_args(node))
        self.result.matched += 1

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            self.patterns.apply(graph)
        graph.eliminate_dead_code()
        return result
