"""Gemma pass: ``rms_norm(x, w.float() + c, eps)`` -> ``rms_norm(x, w, eps, weight_offset=c)``.

Matches the weight argument of every norm op whose ``weight_offset`` is 0 when it is
``aten.add.Tensor(convert(w, float32), c)`` (either operand order; the convert is absent when
``w`` is already float32), with ``c`` any non-zero Python number, matched as an argument.

Numerics are identical: with ``weight_offset == 0`` the op multiplies by the float32 weight
``w.float() + c``; with ``weight_offset = c`` it computes the same ``w.to(float32) + c``, provided
x's compute dtype is float32 (x is float16, bfloat16 or float32; float64 x computes in float64
and is refused). ``c == 0`` is refused: offset 0 would switch to the weight's own dtype.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass


def _weight_index(name: str) -> int:
    return 2 if P.has_residual(name) else 1


def _split_offset(weight: torch.fx.Node | None) -> tuple[torch.fx.Node, float] | str:
    """``(w, c)`` when ``weight`` is ``w.float() + c``; else the reason it is not."""
    if not isinstance(weight, torch.fx.Node) or weight.target is not P.aten.add.Tensor:
        return "weight is not `w.float() + c`"
    if len(weight.args) != 2 or weight.kwargs.get("alpha", 1) != 1:
        return "weight add has alpha != 1"
    a, b = weight.args
    tensor, c = (a, b) if P.is_scalar(b) else (b, a)
    if not P.is_scalar(c) or not isinstance(tensor, torch.fx.Node):
        return "weight add is not tensor + Python number"
    if c == 0:
        return "weight offset 0 would change the weight dtype"
    if tensor.target is P.prims.convert_element_type.default and tensor.args[1] == torch.float32:
        w = tensor.args[0]
    elif tensor.target is P.aten._to_copy.default and tensor.kwargs.get("dtype") == torch.float32 and len(tensor.kwargs) == 1:
        w = tensor.args[0]
    else:
        w = tensor
    wv = P.val(w)
    if wv is None or wv.dtype not in (torch.float16, torch.bfloat16, torch.float32) or wv.dim() != 1:
        return "weight before the offset is not a 1-D float16/bfloat16/float32 tensor"
    if P.val(weight).dtype != torch.float32:
        return "weight + offset is not computed in float32"
    return w, float(c)


class GemmaPass(PatternPass):
    name = "gemma"

    def entries(self):
        for name in P.norm_names():
            yield CallFunctionVarArgs(P.overload(name)), self._check, self._rewrite

    def _check(self, match: Match) -> bool:
        node = match.output_node()
        name = P.op_name(node)
        args = P.norm_args(node)
        weight = args[_weight_index(name)]
        if not isinstance(weight, torch.fx.Node) or weight.target is not P.aten.add.Tensor:
            return False  # not a Gemma site at all: nothing to report
        reason = None
        split = _split_offset(weight)
        if isinstance(split, str):
            reason = split
        elif args[-2] != 0:
            reason = "norm already has a weight_offset"
        elif P.val(args[0]).dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reason = "x is float64: the offset would be added in float64"
        if reason:
            self.result.skip(P.site(node), reason)
            return False
        return True

    def _rewrite(self, match: Match, *args, **kwargs) -> None:
        node = match.output_node()
        name = P.op_name(node)
        new_args = P.norm_args(node)
        i = _weight_index(name)
        w, c = _split_offset(new_args[i])
        new_args[i], new_args[-2] = w, c
        node.args, node.kwargs = tuple(new_args), {}
        self.result.matched += 1

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            self.patterns.apply(graph)
        graph.eliminate_dead_code()
        return result
