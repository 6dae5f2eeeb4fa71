"""Residual pass: ``h = a + b; rms_norm(h, ...)`` -> ``fused_add_rms_norm(a, b, ...)``.

Also ``rms_norm_<s>`` -> ``fused_add_rms_norm_<s>``. ``h``'s other users (the residual stream)
read the fused op's ``residual_out`` instead, so chains of layers fuse one after another.
The add is fused only when it computes exactly what the fused op computes: ``aten.add.Tensor``
of two tensors of the same shape and dtype (no broadcasting, no type promotion), ``alpha`` 1.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match, stable_topological_sort

from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass


def _reason(add: torch.fx.Node) -> str | None:
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return "residual add has alpha != 1"
    a, b = add.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return "add of a tensor and a scalar"
    va, vb, vh = P.val(a), P.val(b), P.val(add)
    if not all(isinstance(v, torch.Tensor) for v in (va, vb, vh)):
        return "add operands have no fake tensor"
    if va.dtype != vb.dtype or va.dtype != vh.dtype:
        return "residual add mixes dtypes"
    if not (P.same_shape(va, vb) and P.same_shape(va, vh)):
        return "residual add broadcasts"
    if va.device != vb.device:
        return "residual add operands on different devices"
    return None


class ResidualPass(PatternPass):
    name = "residual"

    def entries(self):
        for name in P.norm_names():
            if not P.has_residual(name):
                yield CallFunctionVarArgs(P.overload(name)), self._check, self._rewrite

    def _check(self, match: Match) -> bool:
        node = match.output_node()
        x = P.norm_args(node)[0]
        if not isinstance(x, torch.fx.Node) or x.target is not P.aten.add.Tensor:
            return False  # no add in front of this norm: not a residual site
        reason = _reason(x)
        if reason:
            self.result.skip(P.site(node), reason)
            return False
        return True

    def _rewrite(self, match: Match, *args, **kwargs) -> None:
        norm = match.output_node()
        graph = norm.graph
        name = P.op_name(norm)
        norm_args = P.norm_args(norm)
        add = norm_args[0]
        a, b = add.args
        with graph.inserting_before(norm):
            fused = P.call(graph, P.overload(P.with_residual(name)), (a, b, *norm_args[1:]))
            n_out = len(fused.meta["val"]) - 1  # the norm's own outputs; residual_out is last
            residual_out = P.getitem(graph, fused, n_out)
            if P.is_multi_output(norm):
                for index, users in P.output_users(norm).items():
                    for user in users:
                        user.args = (fused, index)
            else:
                norm.replace_all_uses_with(P.getitem(graph, fused, 0))
        add.replace_all_uses_with(residual_out, delete_user_cb=lambda user: user is not norm)
        graph.erase_node(norm)
        graph.erase_node(add)
        self.result.matched += 1

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            if self.patterns.apply(graph):
                stable_topological_sort(graph)  # h's other users may sit before the norm
        return result
