"""Sandwich pass: ``fused_add_rms_norm(rms_norm(x, ...), residual, ...)`` -> ``rms_norm_add_rms_norm``.

Gemma 2 and 3 normalize each block's output (``post_attention_layernorm``,
``post_feedforward_layernorm``) before it joins the residual stream, and the next norm
normalizes the sum. After the residual pass such a site is an ``rms_norm`` whose one user is
a ``fused_add_rms_norm``. ``rms_norm_add_rms_norm`` does both norms and the add in one pass
over the rows, so the normalized block output is never written and read back (4 bytes per
element in 16-bit); in training its autograd formula runs the two norms' backwards.

Either operand of the add may be the norm's output (the add commutes, bit for bit). The pass
runs after ``quant``: a sum whose norm feeds a quantizer keeps that fusion. A site stays as it
was, with its reason, when the first norm's output has other users (it must be written
anyway) or either norm has a ``variance_size`` window (the fused op has none).
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass

OP = "rms_norm_add_rms_norm"


def _norm_operand(fused: torch.fx.Node) -> tuple[torch.fx.Node | None, str | None]:
    """(the add operand that is an ``rms_norm`` output, None) or (None, why it cannot fuse);
    (None, None) where no operand is a norm (not a sandwich site)."""
    args = P.norm_args(fused)
    norms = [a for a in args[:2] if P.op_name(a) == P.NORM]
    if not norms:
        return None, None
    if args[5] is not None:
        return None, "the sum's norm has a variance_size window"
    why = None
    for norm in norms:
        if len(norm.users) != 1:
            why = "the first norm's output has other users (it is written anyway)"
        elif P.norm_args(norm)[4] is not None:
            why = "the first norm has a variance_size window"
        else:
            return norm, None
    return None, why


class SandwichPass(PatternPass):
    name = "sandwich"

    def entries(self):
        yield CallFunctionVarArgs(P.overload(P.ADD_NORM)), self._check, self._rewrite

    def _check(self, match: Match) -> bool:
        fused = match.output_node()
        norm, why = _norm_operand(fused)
        if why:
            self.result.skip(P.site(fused), why)
        return norm is not None

    def _rewrite(self, match: Match, *args, **kwargs) -> None:
        fused = match.output_node()
        graph = fused.graph
        norm, _ = _norm_operand(fused)
        a, b, weight, eps, weight_offset, _ = P.norm_args(fused)
        residual = b if a is norm else a
        x, x_weight, x_eps, x_weight_offset, _ = P.norm_args(norm)
        with graph.inserting_before(fused):
            new = P.call(graph, P.overload(OP), (x, residual, x_weight, x_eps, weight, eps,
                                                 x_weight_offset, weight_offset))
        fused.replace_all_uses_with(new)  # its getitem users: the same two outputs
        graph.erase_node(fused)
        graph.erase_node(norm)
        self.result.matched += 1

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            self.patterns.apply(graph)
        return result
