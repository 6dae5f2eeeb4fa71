"""The quant pass's MXFP8 sites: a norm output quantized the way torchao's ``to_mx`` does it
(torchao/prototype/mx_formats/mx_tensor.py, as Dynamo traces it) -> ``rms_norm_mxfp8`` /
``fused_add_rms_norm_mxfp8``.

The traced form, ``b = y.reshape(..., H/bs, bs)``, ``amax = |b|.amax(-1).unsqueeze(-1)``
(or ``amax(-1, keepdim=True)``), ``y.float()`` / ``amax.float()`` where y is 16-bit:

- floor / ceil: ``e = ((amax.view(int32) >> 23) & 255) - 127`` (ceil: ``+ ((bits & 0x7FFFFF)
  > 0)``), ``code = where(isnan(amax), 255, (clamp(e - 8, -127, 128) + 127).to(uint8))``,
  ``v = b / clamp_min((code.int() << 23).view(float32), 2^-126)``;
- rceil: ``d = amax / 448``, ``code = where(isnan(d), 255, where(isinf(d), 254,
  (clamp(ceil(log2(d)), -127, 127) + 127).to(uint8)))``, ``v = b * where(code == 255, d,
  where(code == 254, 2^-127, where(code == 0, 1, exp2(127 - code.float()))))``;
- ``q = v[.clamp(-448, 448)].to(float8_e4m3fn).reshape(y.shape)`` (torchao clamps only
  eagerly); the user's scale is ``code.view(float8_e8m0fnu).squeeze(-1)``.

The bit-layout constants of float32 (23, 255, 0x7FFFFF, 127 in ``exp2(127 - c)``) are part of
the pattern; the scheme's choices (e4m3's largest power of two 8, the exponent clamp, the
E8M0 bias and NaN / inf codes, the minimum scale, 448, the element clamp) are matched as
arguments and compared with ops/schemes/mxfp8.py, each difference refused with a reason.
torchao's ``even`` mode (a masked store restores NaN) is not matched.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, Match

from ..ops import quant as Q
from ..ops.schemes import mxfp8 as MX
from . import patterns as P
from . import quant as QP

aten = P.aten
F32 = torch.float32
# torch.bitwise_*_shift (torchao's spelling) and the operators >> / <<
_RSHIFT = [aten.bitwise_right_shift.Tensor_Scalar, aten.__rshift__.Scalar]
_LSHIFT = [aten.bitwise_left_shift.Tensor_Scalar, aten.__lshift__.Scalar]


def _call(target: Any, *args: Any, users: Any = 1) -> CallFunction:
    return CallFunction(target, *args, _users=users)


def _amaxes(cast: bool) -> list[tuple[Any, Any]]:
    """(grouped y as float32, per-block amax as float32 read twice) for each spelling."""
    groups = _call(QP._VIEW, KeywordArg("y"), KeywordArg("gshape"), users=MULTIPLE)
    data = QP._conv(groups, F32) if cast else groups
    magnitude = _call(aten.abs.default, groups)
    out = []
    for keep in (False, True):
        users = 1 if cast else MULTIPLE
        if keep:
            amax = _call(aten.amax.default, magnitude, KeywordArg("dims"), KeywordArg("keepdim"), users=users)
        else:
            amax = _call(aten.unsqueeze.default, _call(aten.amax.default, magnitude, KeywordArg("dims")),
                         KeywordArg("bdim"), users=users)
        out.append((data, QP._conv(amax, F32, MULTIPLE) if cast else amax))
    return out


def _floor_codes(amax: Any, ceil: bool) -> tuple[Any, Any]:
    """(E8M0 codes, the scale the elements are divided by) of floor / ceil."""
    bits = _call(aten.view.dtype, amax, torch.int32, users=MULTIPLE if ceil else 1)
    exponent = _call(aten.sub.Tensor, _call(aten.bitwise_and.Scalar, _call(
        _RSHIFT, bits, 23), 255), KeywordArg("bias"))
    if ceil:
        inexact = _call(aten.gt.Scalar, _call(aten.bitwise_and.Scalar, bits, 0x7FFFFF), 0)
        exponent = _call(aten.add.Tensor, exponent, inexact)
    unbiased = _call(aten.sub.Tensor, exponent, KeywordArg("max_pow2"))
    out = []
    for clamped in QP._clamps(unbiased, "elo", "ehi"):
        biased = QP._conv(_call(aten.add.Tensor, clamped, KeywordArg("bias2")), torch.uint8)
        codes = _call(aten.where.self, _call(aten.isnan.default, amax), KeywordArg("nan_code"), biased,
                      users=MULTIPLE)
        scale = _call(aten.clamp_min.default, _call(aten.view.dtype, _call(
            _LSHIFT, QP._conv(codes, torch.int32), 23), F32),
            KeywordArg("min_scale"))
        out.append((codes, scale))
    return out


def _rceil_codes(amax: Any) -> list[tuple[Any, Any]]:
    """(E8M0 codes, the factor the elements are multiplied by) of rceil."""
    descale = _call(aten.div.Tensor, amax, KeywordArg("qmax"), users=MULTIPLE)
    lg = _call(aten.ceil.default, _call(aten.log2.default, descale))
    out = []
    for clamped in QP._clamps(lg, "elo", "ehi"):
        finite = QP._conv(_call(aten.add.Tensor, clamped, KeywordArg("bias2")), torch.uint8)
        codes = _call(aten.where.self, _call(aten.isnan.default, descale), KeywordArg("nan_code"),
                      _call(aten.where.self, _call(aten.isinf.default, descale), KeywordArg("inf_code"), finite),
                      users=MULTIPLE)
        power = _call(aten.exp2.default, _call(aten.sub.Tensor, 127, QP._conv(codes, F32)))
        factor = _call(aten.where.self, _call(aten.eq.Scalar, codes, KeywordArg("nan_code2")), descale,
                       _call(aten.where.self, _call(aten.eq.Scalar, codes, KeywordArg("inf_code2")),
                             KeywordArg("inf_factor"),
                             _call(aten.where.self, _call(aten.eq.Scalar, codes, 0), KeywordArg("one"), power)))
        out.append((codes, factor))
    return out


@functools.cache
def mx_patterns() -> tuple[tuple[Any, str, Any], ...]:
    """``(q pattern, scaling mode, codes pattern)`` of every spelling."""
    out = []
    for cast in (True, False):
        for data, amax in _amaxes(cast):
            for mode in ("floor", "ceil", "rceil"):
                if mode == "rceil":
                    sites = [(c, _call(aten.mul.Tensor, data, f)) for c, f in _rceil_codes(amax)]
                else:
                    sites = [(c, _call(aten.div.Tensor, data, s)) for c, s in _floor_codes(amax, mode == "ceil")]
                for codes, v in sites:
                    for c in [v, *QP._clamps(v, "lo", "hi")]:
                        q = _call(QP._VIEW, QP._conv(c, KeywordArg("qdtype")), KeywordArg("qshape"))
                        out.append((q, mode, codes))
    return tuple(out)


def _constant(value: Any) -> Any:
    """A Python number, or the value of a 0-d ``full`` / ``scalar_tensor`` node; else None."""
    if P.is_scalar(value):
        return value
    if isinstance(value, torch.fx.Node):
        if value.target is aten.scalar_tensor.default:
            return value.args[0]
        if value.target is aten.full.default and value.args[0] in ([], ()):
            return value.args[1]
    return None


def _constants_reason(kw: dict, mode: str) -> str | None:
    """Why the site's constants differ from ops/schemes/mxfp8.py's (None: they agree)."""
    ehi = MX.E8M0_BIAS if mode == "rceil" else MX.E8M0_BIAS + 1
    expected = {"bias2": MX.E8M0_BIAS, "elo": -MX.E8M0_BIAS, "ehi": ehi, "nan_code": MX.E8M0_NAN}
    if mode == "rceil":
        expected.update(qmax=Q.FP8_MAX, inf_code=254, nan_code2=MX.E8M0_NAN, inf_code2=254,
                        inf_factor=2.0 ** -127, one=1.0)
    else:
        expected.update(bias=MX.E8M0_BIAS, max_pow2=MX.E4M3_MAX_POW2, min_scale=MX.F32_MIN_NORMAL)
    for name, want in expected.items():
        got = _constant(kw[name])
        if got is None or QP._f32(got) != QP._f32(want):
            return f"MX {mode} constant {name}={got if got is not None else kw[name]} differs from {want}"
    if "lo" in kw and (QP._f32(kw["lo"]), QP._f32(kw["hi"])) != (-Q.FP8_MAX, Q.FP8_MAX):
        return f"clamp bounds ({kw['lo']}, {kw['hi']}) differ from ({-Q.FP8_MAX}, {Q.FP8_MAX})"
    return None


def _block_reason(m: Match) -> str | None:
    """Why the grouping / amax is not one scale per block of the last dim (None: it is)."""
    kw = m.kwargs
    yv = P.val(kw["y"])
    if QP._group_size(m) is None:
        return "grouping view does not split the last dim into whole blocks"
    dims = [d % (yv.dim() + 1) for d in kw["dims"]] if isinstance(kw["dims"], (list, tuple)) else None
    if dims != [yv.dim()]:
        return "block amax is not over the block dim"
    if "keepdim" in kw and kw["keepdim"] is not True:
        return "block amax is not kept as [..., H/bs, 1]"
    if "bdim" in kw and kw["bdim"] % (yv.dim() + 1) != yv.dim():
        return "block amax is not unsqueezed on its last dim"
    if not P.same_shape(P.val(m.output_node()), yv):
        return "quantized value is not viewed back to the shape of y"
    return None


def check(quant_pass: Any, mode: str, codes_pattern: Any, m: Match) -> bool:
    kw = m.kwargs
    if kw["qdtype"] != Q.FP8_DTYPE or QP.norm_of(kw["y"]) is None:
        return False  # not an MXFP8 quantization of a norm: nothing to report
    yv = P.val(kw["y"])
    reason = None
    if yv is None or yv.dtype not in (torch.float16, torch.bfloat16, F32):
        reason = "quantized value is not float16/bfloat16/float32"
    reason = reason or _constants_reason(kw, mode) or _block_reason(m)
    if reason is None:
        reason = QP._norm_reason(kw["y"], set(m.nodes))
    if reason is None:
        # Only the codes may be read outside (the user's scales); anything else would keep the
        # unfused computation alive next to the fused op.
        codes = m.ctx.pattern_to_node[codes_pattern]
        inside = set(m.nodes)
        if any(u not in inside for n in inside - {m.output_node(), codes} for u in n.users):
            reason = "an intermediate of the MX quantization has other users"
    if reason:
        quant_pass.result.skip(P.site(m.output_node()), reason)
        return False
    return True


def rewrite(quant_pass: Any, mode: str, codes_pattern: Any, m: Match, *args, **kwargs) -> None:
    """Fuse; the user's uint8 codes ``[..., H/bs, 1]`` become the op's E8M0 scales."""
    codes, anchor = m.ctx.pattern_to_node[codes_pattern], m.output_node()
    block = list(m.kwargs["gshape"])[-1]
    norm, _ = QP.norm_of(m.kwargs["y"])
    fused = quant_pass._fuse(m.kwargs["y"], "mxfp8", [block, mode], [anchor, None], anchor, [])
    graph = fused.graph
    with graph.inserting_after(fused):
        scales = P.getitem(graph, fused, 1)
    with graph.inserting_after(scales):
        kept = P.call(graph, aten.unsqueeze.default, (scales, -1))  # [..., H/bs, 1] E8M0
    for user in [u for u in codes.users if u not in set(m.nodes)]:
        if user.target is aten.view.dtype and user.args[1] == MX.E8M0_DTYPE:
            # torchao's ``code.view(e8m0).squeeze(-1)`` is the op's scales as they are
            for sq in [u for u in user.users if u.target is aten.squeeze.dim
                       and statically_known_true(P.val(u).dim() == P.val(scales).dim())]:
                sq.replace_all_uses_with(scales)
            user.replace_all_uses_with(kept)
        else:
            with graph.inserting_after(kept):
                raw = P.call(graph, aten.view.dtype, (kept, torch.uint8))
            user.replace_input_with(codes, raw)
    QP._erase_unused([*m.nodes, m.kwargs["y"], norm, kept])


def entries(quant_pass: Any):
    """The quant pass's (pattern, check, rewrite) entries for MXFP8 sites."""
    for q, mode, codes in mx_patterns():
        yield (q, functools.partial(check, quant_pass, mode, codes),
               functools.partial(rewrite, quant_pass, mode, codes))
