"""Lower pass: every remaining compile_norm IR node becomes its implementation.

``generated`` mode (default): the node is replaced by its reference decomposition, traced on
the node's fake tensors and inlined, so Inductor fuses it with its neighbours into generated
kernels. ``kernel`` mode: a node is kept as a call to the op only where a registered kernel
(a non-native provider that is supported here and accepts the node's fake tensors) would run
it; the Triton ``triton_op`` wrapping that makes such a call visible to Inductor comes from the
kernels work. Nodes no kernel accepts are inlined as in ``generated`` mode, because an opaque
call of the native reference would only be slower.
"""

from __future__ import annotations

import functools

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match, PatternMatcherPass, register_graph_pattern

from ..lowerings import reference_for
from ..ops import registry
from . import patterns as P
from .base import PassResult

NAME = "lower"


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


_STATE: dict = {}


def _check(match: Match) -> bool:
    node = match.output_node()
    result, options = _STATE["result"], _STATE["options"]
    if options.lowering == "kernel":
        provider = kernel_for(node)
        if provider is not None:
            result.skip(P.site(node), f"kept as a call to kernel {provider!r}")
            return False
    return True


def _inline(match: Match, *args, **kwargs) -> None:
    node = match.output_node()
    match.replace_by_example(reference_for(node.target), P.norm_args(node))
    _STATE["result"].matched += 1


@functools.cache
def _pass() -> PatternMatcherPass:
    pm = PatternMatcherPass(pass_name="compile_norm_lower")
    for name in registry.ops():
        register_graph_pattern(CallFunctionVarArgs(P.overload(name)), extra_check=_check, pass_dict=pm)(_inline)
    return pm


def run(graph: torch.fx.Graph, options) -> PassResult:
    result = PassResult(NAME)
    _STATE.update(result=result, options=options)
    try:
        _pass().apply(graph)
    finally:
        _STATE.clear()
    graph.eliminate_dead_code()
    return result
