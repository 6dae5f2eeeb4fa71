"""Quant pass: a norm followed by activation quantization -> one fused norm-quant op.

Two kinds of site:

1. ``quant_<s>(y, ...)`` of a compile_norm quant op, where ``y`` is ``rms_norm(...)``,
   ``rms_norm_gated(...)`` or the first output of ``fused_add_rms_norm(...)`` ->
   ``rms_norm_<s>`` / ``rms_norm_gated_<s>`` / ``fused_add_rms_norm_<s>``.
2. Hand-written quantization of ``y`` as it appears in post-grad graphs (``y.float()`` is
   ``prims.convert_element_type``; ``clamp`` is ``clamp_min`` + ``clamp_max`` or ``clamp``):
   - FP8 static: ``(y.float() / scale).clamp(-448, 448).to(float8_e4m3fn)``;
   - INT8 static: ``(y.float() / scale).round() [+ azp]).clamp(-128, 127).to(int8)``;
   - INT8 dynamic per token: ``s = (amax / 127).clamp(min=1e-10)``,
     ``q = (y.float() / s).round().clamp(-128, 127).to(int8)``;
   - FP8 dynamic, per token, per group (``g = y.view(..., H/g, g)``, any g dividing H) or per
     tensor (amax over every element: fp8_dynamic_tensor):
     ``q = [clamp(-448, 448)](z / s or z * r).to(float8_e4m3fn)`` [viewed back], with the scale
     read by ``fp8_scale.read_scale``: the spellings of vLLM, DeepSeek-V3 and torchao (its
     minimum, where it clamps, ``y / s``, ``y * reciprocal(s)``, torchao's float64 inverse,
     a scale in x's dtype) become the scheme's arguments; the user's scale (``[..., 1]``,
     ``[..., H/g, 1]``, ``[..., H/g]``, or one element of any rank per tensor) becomes a view
     of the op's. The cast may omit the clamp: a dynamic scale without ``scale_ub`` bounds
     the quotient by 448 (1 + 2**-8), which the cast rounds to 448 as the clamp would.
   ``y`` is a norm output as in 1 (the gated norm's: its quantization fuses as the plain
   norm's does).
   The constants (448, 127, the clamp bounds, the minimum scale) are matched as arguments and
   compared with the op's contract; anything else is refused with a reason. A static FP8
   scale applied as a multiply, ``y * m`` (``m = 1 / s`` or any one-element multiplier), is
   ``fp8_static`` with ``scale_form="inverse"`` and ``m`` as its scale: the same product.

Identical quantization chains of one norm output are merged first (torchao quantizes an
activation once per linear that reads it).

Guard: every user of the norm output ``y`` must be inside the matched quantization; a norm
whose output is also used elsewhere is left unfused (the fused ops do not return ``y``).
Hand-written INT8 differs from the op only for NaN input (the op maps NaN to 0; a cast of NaN
to int8 is undefined behaviour), so those sites fuse.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    CallFunctionVarArgs,
    KeywordArg,
    Match,
    stable_topological_sort,
)

from ..ops import quant as Q
from ..ops import registry
from ..ops.quant import SCHEMES
from ..ops.spec import Kind
from . import fp8_scale
from . import patterns as P
from .base import PassResult
from .pattern_pass import PatternPass

aten, prims = P.aten, P.prims
F32 = torch.float32


# --- the fused rewrite shared by both kinds of site ------------------------------------------


def norm_of(y: Any) -> tuple[torch.fx.Node, int | None] | None:
    """``(norm node, getitem index)`` when ``y`` is a fusable norm output, else None."""
    if P.op_name(y) in (P.NORM, P.GATED):
        return y, None
    if isinstance(y, torch.fx.Node) and y.target is operator.getitem and y.args[1] == 0:
        if P.op_name(y.args[0]) == P.ADD_NORM:
            return y.args[0], 0
    return None


def _norm_reason(y: Any, inside: set) -> str | None:
    if norm_of(y) is None:
        return "quantized value is not a compile_norm norm output"
    if any(u not in inside for u in y.users):
        return "norm output has other users"  # the fused ops do not return the norm output
    return None


def fuse(y: torch.fx.Node, scheme: str, qargs: list, outputs: list, before: torch.fx.Node, old: list) -> torch.fx.Node:
    """Replace norm ``y`` + quantization by one fused op; ``outputs[i]`` becomes its output i.

    ``old`` (the matched nodes) and the norm are erased at once, so the pattern matcher never
    sees the dead chain again."""
    norm, _ = norm_of(y)
    graph = norm.graph
    residual = P.op_name(norm) == P.ADD_NORM
    # the norm's arguments with the scheme's: the fused op's own layout (OpSpec.split / join)
    call = P.spec_of(norm).split(tuple(P.norm_args(norm)))
    fused_spec = registry.spec(P.with_scheme(P.op_name(norm), scheme))
    args = fused_spec.join(call._replace(qargs=tuple(qargs)))
    with graph.inserting_before(before):
        fused = P.call(graph, P.overload(fused_spec.name), args)
        multi = P.is_multi_output(fused)
        for index, output in enumerate(outputs):
            if output is None:  # the caller replaces this one itself
                continue
            output.replace_all_uses_with(P.getitem(graph, fused, index) if multi else fused)
        if residual:
            for user in P.output_users(norm).get(1, []):
                user.args = (fused, len(SCHEMES[scheme].outputs))
    _erase_unused([*old, y, norm])
    return fused


def _erase_unused(nodes: list) -> None:
    pending = {n for n in nodes if isinstance(n, torch.fx.Node)}
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.discard(node)
                changed = True


# --- one quantization per norm output ---------------------------------------------------------

# Value-only ops a hand-written quantization is made of (no mutation, no randomness).
_PURE = frozenset({
    prims.convert_element_type.default, aten.abs.default, aten.amax.default, aten.max.dim,
    aten.max.default,
    operator.getitem, aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor,
    aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default, aten.reciprocal.default,
    aten.round.default, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.minimum.default, aten.exp2.default, aten.log2.default, aten.ceil.default,
    aten.floor.default,
})


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def merge_repeated_quantizations(graph: torch.fx.Graph) -> int:
    """Merge identical value-only nodes downstream of norm outputs; returns how many.

    torchao quantizes an activation once per linear that reads it (a Llama block's q, k and
    v projections: three identical amax / scale / cast chains of one norm output), which no
    earlier pass merges; one chain with shared users is what fuses with the norm."""
    downstream, seen, merged = set(), {}, 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if P.op_name(node) in (P.NORM, P.ADD_NORM, P.GATED):
            downstream.add(node)
            continue
        if node.target not in _PURE or not any(i in downstream for i in node.all_input_nodes):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        first = seen.setdefault(key, node)
        if first is node:
            downstream.add(node)
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        merged += 1
    return merged


# --- hand-written quantization: its patterns, and what the checks compare -------------------


def _conv(arg: Any, dtype: Any, users: Any = 1) -> CallFunction:
    return CallFunction(prims.convert_element_type.default, arg, dtype, _users=users)


def _clamps(v: Any, lo: str, hi: str) -> list:
    lo_arg, hi_arg = KeywordArg(lo), KeywordArg(hi)
    return [
        CallFunction(aten.clamp_max.default, CallFunction(aten.clamp_min.default, v, lo_arg), hi_arg),
        CallFunction(aten.clamp_min.default, CallFunction(aten.clamp_max.default, v, hi_arg), lo_arg),
        CallFunction(aten.clamp.default, v, lo_arg, hi_arg),
    ]


def _y_pairs() -> list[tuple[Any, Any]]:
    """The float32 view of ``y`` as read twice (amax and divide): shared, separate, or y itself."""
    y = KeywordArg("y")
    shared = _conv(y, F32, MULTIPLE)
    return [(shared, shared), (_conv(y, F32), _conv(y, F32)), (y, y)]


# The pattern builders are cached: every QuantPass (one per compile) registers the same
# patterns, which only describe graphs (matching keeps its state in the Match).


@functools.cache
def _static_patterns(kind: str) -> tuple:
    out = []
    for yf in (_conv(KeywordArg("y"), F32), KeywordArg("y")):
        if kind == "fp8":
            cores = [CallFunction(aten.div.Tensor, yf, KeywordArg("scale"))]
        elif kind == "fp8_mul":
            cores = [CallFunction(aten.mul.Tensor, yf, KeywordArg("scale"))]
        else:
            rounded = CallFunction(aten.round.default, CallFunction(aten.div.Tensor, yf, KeywordArg("scale")))
            cores = [rounded, CallFunction(aten.add.Tensor, rounded, KeywordArg("azp"))]
        for core in cores:
            out += [_conv(c, KeywordArg("qdtype")) for c in _clamps(core, "lo", "hi")]
    return tuple(out)


@functools.cache
def _fp8_dynamic_patterns(grouped: bool) -> tuple[tuple[Any, bool], ...]:
    """``(q pattern, multiplies)``: ``to_fp8([clamp](z / s))`` or ``z * s``, ``z`` the float32
    view of ``y`` (or ``y``), grouped: a view of it ``[..., H/g, g]`` and ``q`` viewed back.
    ``s`` is any node: ``fp8_scale.read_scale`` reads its arithmetic."""
    out = []
    for yf in (_conv(KeywordArg("y"), F32, MULTIPLE), KeywordArg("y")):
        z = CallFunction(_VIEW, yf, KeywordArg("gshape"), _users=MULTIPLE) if grouped else yf
        for multiply, target in ((False, aten.div.Tensor), (True, aten.mul.Tensor)):
            core = CallFunction(target, z, KeywordArg("s"))
            for c in [*_clamps(core, "lo", "hi"), core]:  # a dynamic scale bounds the quotient
                q = _conv(c, KeywordArg("qdtype"))
                if grouped:
                    q = CallFunction(_VIEW, q, KeywordArg("qshape"))
                out.append((q, multiply))
    return tuple(out)


@functools.cache
def _dynamic_patterns(kind: str) -> tuple[tuple[Any, Any], ...]:
    """``(q pattern, scale pattern)`` pairs; the scale is also an output (MULTIPLE users)."""
    out = []
    for yf_amax, yf_div in _y_pairs():
        amax = CallFunction(aten.amax.default, CallFunction(aten.abs.default, yf_amax), KeywordArg("dims"), KeywordArg("keepdim"))
        scale = CallFunction(
            aten.clamp_min.default,
            CallFunction(aten.div.Tensor, amax, KeywordArg("qmax")),
            KeywordArg("min_scale"),
            _users=MULTIPLE,
        )
        core = CallFunction(aten.div.Tensor, yf_div, scale)
        if kind == "int8":
            core = CallFunction(aten.round.default, core)
        out += [(_conv(c, KeywordArg("qdtype")), scale) for c in _clamps(core, "lo", "hi")]
    return tuple(out)


def _depends_on(node: Any, source: Any) -> bool:
    """Whether ``node`` is computed from ``source`` (a scale from the quantized value itself)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _f32(value: Any) -> float | None:
    """``value`` as the float32 a clamp/divide with this Python scalar uses, or None."""
    if not P.is_scalar(value):
        return None
    return torch.tensor(value, dtype=F32).item()


def _scale_tensor_ok(node: Any, dtype: torch.dtype) -> bool:
    v = P.val(node)
    return isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype == dtype


def _common_reason(m: Match, kind: str) -> str | None:
    """Why the constants of a hand-written site differ from the op's contract (None: equal)."""
    kw = m.kwargs
    fp8 = kind.startswith("fp8")
    qdtype, bound = (Q.FP8_DTYPE, Q.FP8_MAX) if fp8 else (torch.int8, None)
    if kw["qdtype"] != qdtype:
        return "cast is not to the quantized dtype"
    lo, hi = _f32(kw["lo"]), _f32(kw["hi"])
    expected = (-bound, bound) if fp8 else (float(Q.INT8_MIN), float(Q.INT8_MAX))
    if (lo, hi) != expected:
        return f"clamp bounds ({kw['lo']}, {kw['hi']}) differ from {expected}"
    yv = P.val(kw["y"])
    if yv is None or yv.dtype not in (torch.float16, torch.bfloat16, F32):
        return "quantized value is not float16/bfloat16/float32"
    return None


_VIEW = [aten.view.default, aten.reshape.default]


def _group_size(m: Match) -> int | None:
    """The group size when the grouping view splits exactly the last dim of y, else None."""
    yv, gshape = P.val(m.kwargs["y"]), m.kwargs["gshape"]
    if not isinstance(gshape, (list, tuple)) or len(gshape) != yv.dim() + 1:
        return None
    g = gshape[-1]
    if not isinstance(g, int) or g <= 0 or yv.shape[-1] % g != 0:
        return None
    return g


from . import quant_mx  # noqa: E402  (its patterns reuse this module's pieces)


class QuantPass(PatternPass):
    name = "quant"

    def entries(self):
        for spec in registry.specs():
            if spec.kind == Kind.QUANT:
                yield CallFunctionVarArgs(P.overload(spec.name)), self._op_check, self._op_rewrite
        yield from quant_mx.entries(self)  # MXFP8 (torchao's to_mx): passes/quant_mx.py
        # Dynamic forms first: their divide-by-scale tail also looks like a static site.
        for q, scale in _dynamic_patterns("int8"):
            yield q, functools.partial(self._dynamic_check, "int8"), functools.partial(self._dynamic_rewrite, "int8", scale)
        for grouped in (False, True):
            for q, multiply in _fp8_dynamic_patterns(grouped):
                yield q, functools.partial(self._fp8_check, grouped, multiply), functools.partial(self._fp8_rewrite, grouped)
        for kind in ("fp8", "fp8_mul", "int8"):
            for pattern in _static_patterns(kind):
                yield pattern, functools.partial(self._static_check, kind), functools.partial(self._static_rewrite, kind)

    def run(self, graph: torch.fx.Graph, options) -> PassResult:
        with self.running(options) as result:
            merge_repeated_quantizations(graph)
            if self.patterns.apply(graph):
                stable_topological_sort(graph)  # residual_out users may sit before the quant
                graph.eliminate_dead_code()
        return result

    def _fuse(self, *args: Any) -> torch.fx.Node:
        fused = fuse(*args)
        self.result.matched += 1
        return fused

    # --- 1. compile_norm quant ops

    def _op_check(self, match: Match) -> bool:
        node = match.output_node()
        y = node.args[0] if node.args else node.kwargs.get("x")
        if norm_of(y) is None:
            return False
        reason = _norm_reason(y, {node})
        if reason:
            self.result.skip(P.site(node), reason)
            return False
        return True

    def _op_rewrite(self, match: Match, *args, **kwargs) -> None:
        node = match.output_node()
        scheme = P.scheme_of(P.op_name(node))
        qargs, _ = registry.normalize_call(P.op_name(node), tuple(node.args), dict(node.kwargs))
        y = qargs[0]
        if P.is_multi_output(node):
            outputs = [None] * len(SCHEMES[scheme].outputs)
            graph = node.graph
            with graph.inserting_after(node):  # give every output a node to replace
                for i in range(len(outputs)):
                    outputs[i] = P.getitem(graph, node, i)
            for index, users in P.output_users(node).items():
                for user in users:
                    if user is not outputs[index]:
                        user.replace_all_uses_with(outputs[index])
        else:
            outputs = [node]
        self._fuse(y, scheme, list(qargs[1:]), outputs, node, [node, *outputs])

    # --- 2. hand-written quantization

    def _static_check(self, kind: str, m: Match) -> bool:
        if m.kwargs["qdtype"] not in (Q.FP8_DTYPE, torch.int8) or norm_of(m.kwargs["y"]) is None:
            return False  # not a quantization of a norm: nothing to report
        reason = _common_reason(m, kind)
        if _depends_on(m.kwargs["scale"], m.kwargs["y"]):
            return False  # a dynamic scale: the dynamic patterns' business (and their reason)
        if reason is None and not _scale_tensor_ok(m.kwargs["scale"], F32):
            sv = P.val(m.kwargs["scale"])
            if not isinstance(sv, torch.Tensor) or sv.numel() != 1:
                return False  # a per-token scale: the dynamic patterns' business
            reason = "scale is not a float32 tensor"
        if reason is None and "azp" in m.kwargs and not _scale_tensor_ok(m.kwargs["azp"], torch.int32):
            reason = "azp is not a one-element int32 tensor"
        if reason is None:
            reason = _norm_reason(m.kwargs["y"], set(m.nodes))
        if reason:
            self.result.skip(P.site(m.output_node()), reason)
            return False
        return True

    def _static_rewrite(self, kind: str, m: Match, *args, **kwargs) -> None:
        kw = m.kwargs
        if kind.startswith("fp8"):  # y / s, or y * m: m is the inverse scale
            form = "inverse" if kind == "fp8_mul" else "divide"
            self._fuse(kw["y"], "fp8_static", [kw["scale"], form], [m.output_node()], m.output_node(), m.nodes)
        else:
            self._fuse(kw["y"], "int8_static", [kw["scale"], kw.get("azp")], [m.output_node()], m.output_node(), m.nodes)

    def _dynamic_check(self, kind: str, m: Match) -> bool:
        qmax, min_scale = float(Q.INT8_MAX), Q.INT8_MIN_SCALE
        kw = m.kwargs
        if kw["qdtype"] not in (Q.FP8_DTYPE, torch.int8) or norm_of(kw["y"]) is None:
            return False
        reason = _common_reason(m, kind)
        yv = P.val(kw["y"])
        if reason is None:
            dims = [d % yv.dim() for d in kw["dims"]] if isinstance(kw["dims"], (list, tuple)) else None
            if dims != [yv.dim() - 1] or kw["keepdim"] is not True:
                reason = "amax is not over the last dim with keepdim"
        if reason is None and _f32(kw["qmax"]) != qmax:
            reason = f"scale divides amax by {kw['qmax']}, not {qmax}"
        if reason is None and _f32(kw["min_scale"]) != _f32(min_scale):
            reason = f"minimum scale {kw['min_scale']} differs from the op's {min_scale}"
        if reason is None:
            reason = _norm_reason(kw["y"], set(m.nodes))
        if reason:
            self.result.skip(P.site(m.output_node()), reason)
            return False
        return True

    def _dynamic_rewrite(self, kind: str, scale_pattern: Any, m: Match, *args, **kwargs) -> None:
        scale = m.ctx.pattern_to_node[scale_pattern]
        self._fuse(m.kwargs["y"], "int8_dynamic", [], [m.output_node(), scale], m.output_node(), m.nodes)

    # --- hand-written dynamic FP8 (per token, per group): the scale read by fp8_scale

    def _fp8_check(self, grouped: bool, multiply: bool, m: Match) -> bool:
        kw = m.kwargs
        if kw["qdtype"] != Q.FP8_DTYPE or norm_of(kw["y"]) is None:
            return False
        sv = P.val(kw["s"])
        if not isinstance(sv, torch.Tensor):
            return False
        read = fp8_scale.read_scale(kw["s"], multiply)
        if isinstance(read, str) and sv.numel() == 1 and not _depends_on(kw["s"], kw["y"]):
            return False  # a static scale: the static patterns' business
        reason = read if isinstance(read, str) else self._fp8_reason(grouped, m, read)
        if reason:
            self.result.skip(P.site(m.output_node()), reason)
            return False
        m.kwargs["_read"] = read
        return True

    def _fp8_reason(self, grouped: bool, m: Match, read: fp8_scale.ScaleRead) -> str | None:
        kw = m.kwargs
        yv = P.val(kw["y"])
        if yv.dtype not in (torch.float16, torch.bfloat16, F32):
            return "quantized value is not float16/bfloat16/float32"
        if "lo" in kw and (_f32(kw["lo"]), _f32(kw["hi"])) != (-Q.FP8_MAX, Q.FP8_MAX):
            return f"clamp bounds ({kw['lo']}, {kw['hi']}) differ from {(-Q.FP8_MAX, Q.FP8_MAX)}"
        zv = P.val(read.z)
        z_chain = fp8_scale.source_chain(read.z)
        if z_chain[-1] is not kw["y"]:
            return "the scale's amax is not of the quantized value"
        read.nodes += z_chain[:-1]  # its own y.float() / grouping view
        if grouped and read.per_tensor:
            return "a per-tensor scale applied to groups of the quantized value"
        if grouped:
            g = zv.shape[-1]
            if not (isinstance(g, int) and zv.dim() >= 2 and yv.shape[-1] % g == 0
                    and statically_known_true(zv.shape[-2] * g == yv.shape[-1])
                    and statically_known_true(zv.numel() == yv.numel())):
                return "grouping view does not split the last dim into whole groups"
        elif not P.same_shape(zv, yv):
            return "the scale's amax is not of the quantized value"
        sv = P.val(kw["s"])
        # per tensor: one element broadcast to y (0-d, [1], [1, 1, 1]); else [..., 1]
        want = (1,) * min(sv.dim(), yv.dim()) if read.per_tensor else (*zv.shape[:-1], 1)
        if sv.dim() != len(want) or not all(statically_known_true(a == b) for a, b in zip(sv.shape, want)):
            return ("group scale does not divide its group as [..., H/g, 1]" if grouped
                    else "a per-tensor scale of more than one element" if read.per_tensor
                    else "scale is not one per token ([..., 1])")
        inside = {*m.nodes, *read.nodes, *read.broadcast, read.scale}
        reason = _norm_reason(kw["y"], inside)
        if reason:
            return reason
        # Only the scale (and its broadcast) may be read outside: an intermediate used
        # elsewhere would keep the unfused norm alive next to the fused op.
        shared = {m.output_node(), read.scale, *read.broadcast}
        if any(u not in inside for n in inside - shared for u in n.users):
            return "an intermediate of the quantization has other users"
        return None

    def _fp8_rewrite(self, grouped: bool, m: Match, *args, **kwargs) -> None:
        read, q, y = m.kwargs["_read"], m.output_node(), m.kwargs["y"]
        norm, _ = norm_of(y)
        zv = P.val(read.z)
        if grouped:
            scheme, qargs = "fp8_group", [zv.shape[-1], False, False, *read.qargs()]
        elif read.per_tensor:
            scheme, qargs = "fp8_dynamic_tensor", read.qargs()
        else:
            scheme, qargs = "fp8_dynamic", [None, *read.qargs()]  # scale_ub=None
        fused = self._fuse(y, scheme, qargs, [None, None], q, [])
        graph = fused.graph
        with graph.inserting_after(fused):
            new_q, scales = P.getitem(graph, fused, 0), P.getitem(graph, fused, 1)
        if grouped and "qshape" in m.kwargs and not P.same_shape(P.val(q), P.val(new_q)):
            with graph.inserting_after(new_q):
                new_q = P.call(graph, aten.view.default, (new_q, m.kwargs["qshape"]))
        want = P.val(read.scale)
        if not P.same_shape(want, P.val(scales)):  # the user's scale is a view of the op's
            with graph.inserting_after(scales):
                if read.per_tensor:  # the op's 0-d scale as the user's one-element shape
                    scales = P.call(graph, aten.view.default, (scales, list(want.shape)))
                elif not grouped:  # a per-token scale before its unsqueeze(-1)
                    scales = P.call(graph, aten.squeeze.dim, (scales, -1))
                else:
                    gshape = m.kwargs["gshape"]
                    shape = [*gshape[:-1], 1] if want.dim() == zv.dim() else [*gshape[:-1]]
                    scales = P.call(graph, aten.view.default, (scales, shape))
        q.replace_all_uses_with(new_q)
        read.scale.replace_all_uses_with(scales)
        _erase_unused([*m.nodes, *read.nodes, *read.broadcast, read.scale, y, norm])
