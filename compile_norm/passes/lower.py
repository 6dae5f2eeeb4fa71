"""Lower pass: every remaining compile_norm IR node becomes its implementation.

What each node becomes is decided in one place, ``lowerings.choice.lowering_for`` (a pure
function of the node's fake arguments, the provider priority, the measured choices and the
``lowering`` option): generated code (the reference traced on the node's fake tensors and
inlined, so Inductor fuses it with its neighbours), the Triton kernel (the functional graph of
the ``compile_norm_kernels`` triton_op's implementation: a user-defined Triton kernel Inductor
sees and schedules), or a call of the op kept for another provider. Where the kernel cannot be
traced, ``auto`` inlines the reference and ``kernel`` keeps the call, saying why.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from ..lowerings import choice as lowering_choice
from ..lowerings import reference_for
from ..ops import registry
from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass

log = logging.getLogger("compile_norm.passes")
KERNEL_COUNTER = "lower_triton_kernel"


def _fake_args(node: torch.fx.Node) -> list:
    return [P.val(a) if isinstance(a, torch.fx.Node) else a for a in P.norm_args(node)]


def _trace_kernel(node: torch.fx.Node, config=None):
    """(functional graph of the triton_op implementation, "") or (None, why not); ``config``:
    the launch config to trace with (None: the kernel's default)."""
    from ..kernels import library_ops, triton_ops

    if not library_ops.AVAILABLE:
        return None, library_ops.REASON
    args = P.norm_args(node)
    mode = P._fake_mode(tuple(args))
    try:
        with mode if mode is not None else contextlib.nullcontext(), triton_ops.launch_config_used(config):
            gm = library_ops.functional_trace(library_ops.functions()[P.op_name(node)], _fake_args(node))
    except Exception as e:  # e.g. a shape the launch code cannot trace: inline instead
        return None, f"tracing the kernel failed ({type(e).__name__}: {e})"
    if any(n.target is torch.ops.aten.copy_.default for n in gm.graph.nodes):
        # Triton's mutation analysis failed (it assumed every argument is written)
        return None, "kernel mutation analysis failed"
    return gm, ""


class LowerPass(PatternPass):
    """Each op node becomes what ``lowerings.choice.lowering_for`` decides for it."""

    name = "lower"

    def entries(self):
        for name in registry.ops():
            yield CallFunctionVarArgs(P.overload(name)), self._check, self._lower

    def _check(self, match: Match) -> bool:
        return True  # every op node is lowered; _lower decides how

    def _lower(self, match: Match, *args, **kwargs) -> None:
        node = match.output_node()
        mode = self.options.lowering
        how, why = lowering_choice.lowering_for(P.op_name(node), _fake_args(node), mode,
                                                batch_invariant=self.options.batch_invariant,
                                                measure=self.options.measure)
        log.debug("compile_norm lower (%s): %s -> %s (%s)", mode, P.site(node), how, why)
        if how == lowering_choice.KERNEL:
            config = lowering_choice.kernel_config(P.op_name(node), _fake_args(node), self.options.batch_invariant)
            traced, why = _trace_kernel(node, config)
            if traced is not None:
                self.result.lowered.append((node.name, how, why))
                match.replace_by_example(traced, P.norm_args(node), trace_fn=lambda gm, _args: gm)
                self.result.count(KERNEL_COUNTER)  # lowered (matched), to the kernel
                self.result.matched += 1
                return
            if mode == "auto":  # inline rather than an opaque call
                log.info("compile_norm lower: %s inlined, kernel unusable: %s", P.site(node), why)
                how, why = lowering_choice.GENERATED, f"the kernel is unusable: {why}"
            else:
                how, why = lowering_choice.CALL, f"kept as a call to kernel 'triton' ({why})"
        if how == lowering_choice.CALL:
            self.result.skip(P.site(node), why)
            return
        self.result.lowered.append((node.name, how, why))
        match.replace_by_example(reference_for(node.target), P.norm_args(node))
        self.result.matched += 1

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        before = set(graph.nodes)
        with self.running(options) as result:
            self.patterns.apply(graph)
        graph.eliminate_dead_code()
        _mark_eager_roundings(n for n in graph.nodes if n not in before)
        return result


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _mark_eager_roundings(nodes) -> None:
    """Under ``emulate_precision_casts``, Inductor rounds a 16-bit pointwise result where
    eager would only for nodes that tracing marked (``low_precision_pointwise_barrier``, set
    by make_fx for ops the user's code ran). The inlined reference's nodes are such ops: the
    eager op runs them one by one, each rounding its output. The pattern matcher's
    replacement does not carry that mark over, so it is set here, by the same rule make_fx
    uses (a 16-bit output or input)."""
    from torch._inductor import config

    if not config.emulate_precision_casts:
        return
    for node in nodes:
        if node.op != "call_function":
            continue
        vals = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
        if any(isinstance(v, torch.Tensor) and v.dtype in _LOW_PRECISION for v in vals):
            node.meta["low_precision_pointwise_barrier"] = True
