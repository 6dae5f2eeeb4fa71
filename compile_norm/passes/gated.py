"""Gated pass: an RMSNorm with a SiLU gate -> one ``rms_norm_gated`` (ops/gated.py).

Runs after canonicalize (which has made the norm ``rms_norm``). SiLU is matched as Inductor
decomposes it, ``g / (1 + exp(-g))``, or as ``aten.silu``; ``g`` is ``gate.float()`` (or a
float32 gate). Two forms, as transformers writes them:

1. Norm, then gate (``Qwen3NextRMSNormGated``): ``(rms_norm(x, w, eps) * silu(g))[.to(x.dtype)]``
   -> ``rms_norm_gated(x, gate, w, eps)``; the op's reference is that composition.
2. Gate, then a grouped norm (``MambaRMSNormGated``, Mamba-2 / Falcon-H1):
   ``z = x[.float()] * silu(g)``, ``y = rms_norm(z.view(..., H/gs, gs), None, eps).view(x.shape)``
   ``[.to(x.dtype)]``, ``[w * y]`` -> ``rms_norm_gated(x, gate, w, eps, False, gs)``.

The norm must have no weight offset, no variance_size, and (form 2) no weight of its own; the
gate the shape and dtype of x; nothing but the matched chain may read the intermediates.
Anything else is left as it is, with a reason.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, Match

from ..ops import gated as _gated  # noqa: F401  (declares the op this pass targets)
from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass

aten, prims = P.aten, P.prims
F32 = torch.float32
_VIEW = [aten.view.default, aten.reshape.default]


def _silu() -> list:
    g = KeywordArg("g")
    decomposed = CallFunction(aten.div.Tensor, g, CallFunction(
        aten.add.Tensor, CallFunction(aten.exp.default, CallFunction(aten.neg.default, g)), 1))
    return [decomposed, CallFunction(aten.silu.default, g)]


def _muls(a, b, users=1) -> list:
    return [CallFunction(aten.mul.Tensor, a, b, _users=users), CallFunction(aten.mul.Tensor, b, a, _users=users)]


def _with_cast(p) -> list:
    return [p, CallFunction(prims.convert_element_type.default, p, KeywordArg("dtype"))]


def _norms(arg) -> list:
    """``rms_norm(arg, w, eps[, offset, variance_size])`` (the defaults may be left out)."""
    head = (arg, KeywordArg("w"), KeywordArg("eps"))
    # any users: a norm read elsewhere too is refused by the check, with its reason
    return [CallFunction(P.overload(P.NORM), *head, KeywordArg("offset"), KeywordArg("vsize"), _users=MULTIPLE),
            CallFunction(P.overload(P.NORM), *head, _users=MULTIPLE)]


def norm_then_gate_patterns() -> list:
    out = []
    for act in _silu():
        for norm in _norms(KeywordArg("x")):
            for product in _muls(norm, act):
                out += _with_cast(product)
    return out


def gate_then_norm_patterns() -> list:
    out = []
    for act in _silu():
        for z in _muls(KeywordArg("x"), act):
            grouped = [CallFunction(_VIEW, n, KeywordArg("shape"))
                       for n in _norms(CallFunction(_VIEW, z, KeywordArg("gshape")))]
            for y in [*grouped, *_norms(z)]:
                for normed in _with_cast(y):
                    out += [normed, *_muls(KeywordArg("weight"), normed)]
    return out


def _source(node) -> tuple:
    """(the tensor ``node`` converts to float32, or ``node`` itself if it is float32)."""
    if isinstance(node, torch.fx.Node) and node.target is prims.convert_element_type.default \
            and node.args[1] == F32:
        return node.args[0]
    return node


class GatedPass(PatternPass):
    name = "gated"

    def entries(self):
        for p in norm_then_gate_patterns():
            yield p, self._check_after, self._rewrite_after
        for p in gate_then_norm_patterns():
            yield p, self._check_before, self._rewrite_before

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            self.patterns.apply(graph)
            graph.eliminate_dead_code()
        return result

    def _common(self, m: Match, x) -> str | None:
        kw = m.kwargs
        if P.val(kw["g"]) is None or P.val(kw["g"]).dtype != F32:
            return "gate activation is not computed in float32"
        gate, xv = P.val(_source(kw["g"])), P.val(x)
        if xv is None or xv.dtype not in (torch.float16, torch.bfloat16, F32):
            return "gated input is not float16/bfloat16/float32"
        if gate is None or gate.dtype != xv.dtype or not P.same_shape(gate, xv):
            return "gate does not have the shape and dtype of x"
        if kw.get("offset", 0.0) != 0.0 or kw.get("vsize") is not None:
            return "norm has a weight offset or variance_size"
        if "dtype" in kw and kw["dtype"] != xv.dtype:
            return "gated norm is not cast back to x.dtype"
        inside = set(m.nodes)
        if any(u not in inside for n in inside - {m.output_node()} for u in n.users):
            return "an intermediate of the gated norm has other users"
        return None

    def _skip(self, m: Match, reason: str) -> bool:
        self.result.skip(P.site(m.output_node()), reason)
        return False

    # --- 1. norm, then gate

    def _check_after(self, m: Match) -> bool:
        reason = self._common(m, m.kwargs["x"])
        if reason is None and "dtype" not in m.kwargs and P.val(m.kwargs["x"]).dtype != F32:
            reason = "gated norm is not cast back to x.dtype"
        return True if reason is None else self._skip(m, reason)

    def _rewrite_after(self, m: Match, *args, **kwargs) -> None:
        kw = m.kwargs
        self._replace(m, (kw["x"], _source(kw["g"]), kw["w"], kw["eps"], True, None))

    # --- 2. gate, then a grouped norm

    def _check_before(self, m: Match) -> bool:
        kw = m.kwargs
        x = _source(kw["x"])
        reason = self._common(m, x)
        xv = P.val(x)
        if reason is None and kw["w"] is not None:
            reason = "the grouped norm has a weight of its own"
        if reason is None and "gshape" in kw and self._group(m) is None:
            reason = "grouping view does not split the last dim into whole groups"
        if reason is None and "dtype" not in kw and xv.dtype != F32:
            reason = "normalized value is not cast back to x.dtype"
        if reason is None and "weight" in kw:
            wv = P.val(kw["weight"])
            if not isinstance(wv, torch.Tensor) or wv.dim() != 1 or wv.shape[0] != xv.shape[-1]:
                reason = "gate weight is not a [H] tensor"
        if reason is None and not P.same_shape(P.val(m.output_node()), xv):
            reason = "gated norm output does not have the shape of x"
        return True if reason is None else self._skip(m, reason)

    def _group(self, m: Match) -> int | None:
        xv, gshape, shape = P.val(_source(m.kwargs["x"])), m.kwargs["gshape"], m.kwargs["shape"]
        if not isinstance(gshape, (list, tuple)) or len(gshape) != xv.dim() + 1:
            return None
        g = gshape[-1]
        if not isinstance(g, int) or g <= 0 or xv.shape[-1] % g != 0:
            return None
        if not P.same_shape(P.val(m.output_node()), xv) or len(shape) != xv.dim():
            return None
        return g

    def _rewrite_before(self, m: Match, *args, **kwargs) -> None:
        kw = m.kwargs
        x = _source(kw["x"])
        g = self._group(m) if "gshape" in kw else None
        group = None if g is None or g == P.val(x).shape[-1] else g
        self._replace(m, (x, _source(kw["g"]), kw.get("weight"), kw["eps"], False, group))

    def _replace(self, m: Match, args: tuple) -> None:
        node = m.output_node()
        graph = node.graph
        with graph.inserting_before(node):
            fused = P.call(graph, P.overload(P.GATED), args)
        node.replace_all_uses_with(fused)
        self.result.matched += 1
        pending, changed = set(m.nodes), True
        while changed:  # the matched chain, last users first
            changed = False
            for n in [n for n in pending if not n.users]:
                graph.erase_node(n)
                pending.discard(n)
                changed = True

