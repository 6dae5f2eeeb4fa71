"""Reading a hand-written dynamic FP8 scale back from the post-grad graph (the quant pass's).

Libraries spell the scale of ``q = sat(y / s)`` or ``q = sat(y * r)`` differently; each
spelling is one set of the dynamic FP8 schemes' scale arguments
(``ops.quant.fp8_dynamic_scale``). ``read_scale`` walks from the divisor (or multiplier) of
``y`` back to its ``amax`` and returns those arguments, or a reason why the arithmetic is not
one the ops reproduce bit for bit:

- ``s = amax / 448`` with an optional minimum: ``clamp_min`` of ``s`` (vLLM) or of ``amax``
  (DeepSeek-V3's ``act_quant``), or none (torchao inference); ``s`` may be computed in the
  activation's 16-bit dtype and converted to float32 (torchao on a bf16 activation);
- applied as ``y / s`` (``scale_form="divide"``) or ``y * reciprocal(s)`` ("multiply", vLLM's
  native quantizer);
- ``r = float32(448 * reciprocal(float64(amax).clamp(min)))`` applied as ``y * r``
  ("inverse", torchao float8 training's ``amax_to_scale``).

``amax`` is ``|z|.amax(-1, keepdim)`` or ``|z|.max(-1)`` values, or over every element
(``|z|.max()``, ``|z|.amax(all dims)``: ``per_tensor``, the fp8_dynamic_tensor scheme),
possibly followed by ``unsqueeze`` / ``view`` and a float32 conversion; ``z`` is ``y`` (or its
float32 view), or its groups for per-group scales. Where the divisor broadcasts is checked by
the caller.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import quant as Q
from . import patterns as P

aten, prims = P.aten, P.prims
_HALF = (torch.float16, torch.bfloat16)
_VIEWS = (aten.view.default, aten.reshape.default, aten.unsqueeze.default,
          aten._unsafe_view.default)


@dataclass
class ScaleRead:
    """What ``read_scale`` found: the scheme arguments, the node holding the value the op
    returns as its scale (``s``, or ``r`` for "inverse"), the reduced value ``z`` and the
    nodes computing the scale (to check that nothing else reads them)."""

    min_scale: float | None = None
    clamp_amax: bool = False
    scale_form: str = "divide"
    scale_in_x_dtype: bool = False
    pow2_inverse: bool = False  # "inverse" rounded down to a power of two
    per_tensor: bool = False  # amax over every element, not per row / group
    scale: Any = None
    z: Any = None
    nodes: list = field(default_factory=list)
    broadcast: list = field(default_factory=list)  # views of ``scale`` that divide y

    def qargs(self) -> list:
        """The scale arguments read, in the schemes' order (``quant.FP8Scale``)."""
        return [getattr(self, name) for name in Q.FP8Scale._fields]


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _dtype(node: Any) -> Any:
    v = P.val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _clamp_min(node: Any) -> tuple[Any, float] | None:
    """``(input, minimum)`` of ``clamp_min(a, m)`` / ``clamp(a, m)`` with a Python number."""
    if _is(node, aten.clamp_min.default) and P.is_scalar(node.args[1]):
        return node.args[0], float(node.args[1])
    if _is(node, aten.clamp.default) and len(node.args) >= 2 and P.is_scalar(node.args[1]) \
            and (len(node.args) < 3 or node.args[2] is None) and not node.kwargs.get("max"):
        return node.args[0], float(node.args[1])
    return None


def _convert(node: Any, to: torch.dtype) -> Any:
    """The input of ``convert_element_type(a, to)``, else None."""
    if _is(node, prims.convert_element_type.default) and node.args[1] == to:
        return node.args[0]
    return None


def source_chain(node: Any) -> list:
    """``node`` and the exact float32 conversions and views below it, down to the value
    they read (the last element)."""
    chain = [node]
    while True:
        inner = _convert(node, torch.float32)
        if inner is not None and _dtype(inner) in (*_HALF, torch.float32):
            node = inner
        elif _is(node, *_VIEWS):
            node = node.args[0]
        else:
            return chain
        chain.append(node)


def _amax(node: Any, read: ScaleRead) -> str | None:
    """Reads ``amax`` (through views and exact float32 conversions) into ``read.z``."""
    while True:
        inner = _convert(node, torch.float32)
        if inner is not None and _dtype(inner) in (*_HALF, torch.float32):
            read.nodes.append(node)
            node = inner
        elif _is(node, *_VIEWS):
            read.nodes.append(node)
            node = node.args[0]
        else:
            break
    if _is(node, operator.getitem) and node.args[1] == 0 and _is(node.args[0], aten.max.dim):
        read.nodes.append(node)
        node = node.args[0]  # .max(dim)'s values; its indices must be unused
        if any(u.args[1] != 0 for u in node.users):
            return "the amax's max(dim) indices are used"
        dims = [node.args[1]]
    elif _is(node, aten.amax.default):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape = P.val(node.args[0]).shape
        rank, reduced = len(shape), {d % len(shape) for d in dims or ()}
        # every dim, or every dim but ones of size 1 (torchao's [1, T, H] at batch 1 reduces
        # dims 1 and 2); over the last dim alone it is per-token, whatever the token count
        if not dims or (rank > 1 and reduced != {rank - 1}
                        and all(d in reduced or statically_known_true(shape[d] == 1) for d in range(rank))):
            read.per_tensor, dims = True, None
    elif _is(node, aten.max.default):
        read.per_tensor, dims = True, None
    else:
        return "the scale is not computed from an amax of |y|"
    read.nodes.append(node)
    magnitude = node.args[0]
    if not _is(magnitude, aten.abs.default):
        return "the scale is not computed from an amax of |y|"
    read.nodes.append(magnitude)
    z = magnitude.args[0]
    zv = P.val(z)
    if not read.per_tensor and (not isinstance(dims, (list, tuple))
                                or [d % zv.dim() for d in dims] != [zv.dim() - 1]):
        return "amax is not over the last dim"
    read.z = z
    return None


def _read_amax_over_448(node: Any, read: ScaleRead) -> str | None:
    """``amax / 448``, with an optional clamp of amax before the division."""
    if not _is(node, aten.div.Tensor) or not P.is_scalar(node.args[1]):
        return "the scale is not amax / 448"
    if torch.tensor(node.args[1], dtype=torch.float32).item() != Q.FP8_MAX:
        return f"scale divides amax by {node.args[1]}, not {Q.FP8_MAX}"
    read.nodes.append(node)
    amax = node.args[0]
    clamped = _clamp_min(amax)
    if clamped is not None:
        if read.min_scale is not None:
            return "both amax and the scale are clamped"
        if _dtype(clamped[0]) != torch.float32:
            return "amax is clamped in a 16-bit dtype (the op clamps in float32)"
        read.nodes.append(amax)
        amax, read.min_scale, read.clamp_amax = clamped[0], clamped[1], True
    return _amax(amax, read)


def _read_scale(node: Any, read: ScaleRead) -> str | None:
    """``s`` = [clamp_min]([float32](amax / 448))."""
    clamped = _clamp_min(node)
    if clamped is not None:
        if _dtype(clamped[0]) != torch.float32:
            return "the scale is clamped in a 16-bit dtype (the op clamps in float32)"
        read.nodes.append(node)
        node, read.min_scale = clamped
    inner = _convert(node, torch.float32)
    if inner is not None and _dtype(inner) in _HALF:
        read.nodes.append(node)
        node, read.scale_in_x_dtype = inner, True
    elif _dtype(node) != torch.float32:
        return "the scale is not float32"
    return _read_amax_over_448(node, read)


def _read_inverse(node: Any, read: ScaleRead) -> str | None:
    """``r = float32(448 * reciprocal(float64(amax)[.clamp(min)]))``, optionally rounded down
    to a power of two as ``exp2(floor(log2(r)))`` (torchao's round_scales_to_power_of_2)."""
    if _is(node, aten.exp2.default) and _is(node.args[0], aten.floor.default) \
            and _is(node.args[0].args[0], aten.log2.default):
        read.nodes += [node, node.args[0], node.args[0].args[0]]
        node, read.pow2_inverse = node.args[0].args[0].args[0], True
    inner = _convert(node, torch.float32)
    if inner is None or _dtype(inner) != torch.float64:
        return ("the inverse scale is computed in float32 (448 * reciprocal(amax) rounds "
                "twice): the op computes it in float64, as torchao does")
    read.nodes.append(node)
    node = inner
    if not (_is(node, aten.mul.Tensor) and P.is_scalar(node.args[1])
            and _is(node.args[0], aten.reciprocal.default)):
        return "the inverse scale is not 448 * reciprocal(amax)"
    if float(node.args[1]) != Q.FP8_MAX:
        return f"the inverse scale is {node.args[1]} / amax, not {Q.FP8_MAX} / amax"
    read.nodes += [node, node.args[0]]
    node = node.args[0].args[0]
    clamped = _clamp_min(node)
    if clamped is not None:
        read.nodes.append(node)
        node, read.min_scale, read.clamp_amax = clamped[0], clamped[1], True
    wide = _convert(node, torch.float64)
    if wide is None:
        return "the inverse scale's amax is not converted to float64"
    read.nodes.append(node)
    read.scale_form = "inverse"
    return _amax(wide, read)


def read_scale(applied: Any, multiply: bool) -> ScaleRead | str:
    """The scale arithmetic of ``y / applied`` (``multiply``: ``y * applied``), or a reason.

    ``applied`` may broadcast the scale (``unsqueeze`` / ``view``): those nodes are kept in
    ``broadcast`` and ``scale`` is the value before them."""
    read = ScaleRead()
    node = applied
    while _is(node, *_VIEWS[:3]):
        read.broadcast.append(node)
        node = node.args[0]
    if multiply and _is(node, aten.reciprocal.default):
        read.nodes.append(node)
        read.scale_form, node = "multiply", node.args[0]
        while _is(node, *_VIEWS[:3]):
            read.nodes.append(node)
            node = node.args[0]
        reason = _read_scale(node, read)
    elif multiply:
        reason = _read_inverse(node, read)
    else:
        reason = _read_scale(node, read)
    if reason:
        return reason
    read.scale = node
    return read
