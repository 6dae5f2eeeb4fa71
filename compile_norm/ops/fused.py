"""Norm + quantization ops, built from the norm ops and the quantization schemes.

For each scheme ``s`` of ``quant.SCHEMES``:

- ``rms_norm_<s>(x, weight, eps, <scheme args>, weight_offset=0.0, variance_size=None)``
  returns the scheme's outputs of ``quant_<s>(rms_norm(x, ...), ...)``;
- ``fused_add_rms_norm_<s>(x, residual, weight, eps, <scheme args>, weight_offset=0.0,
  variance_size=None)`` returns those outputs followed by ``residual_out = x + residual``;
- ``rms_norm_gated_<s>(x, gate, weight, eps, <scheme args>, norm_before_gate=True,
  norm_group_size=None)`` returns the scheme's outputs of ``quant_<s>(rms_norm_gated(x, ...),
  ...)``. The gated norm's ``group_size`` is called ``norm_group_size`` here: a scheme may
  have a ``group_size`` of its own (fp8_group).

The scheme arguments come right after ``eps`` (custom ops allow no keyword-only Tensor), so
pass them, and the optional norm arguments, by keyword for readable call sites.
The references are literal compositions of the parts: fused equals composed, bit for bit. Their
signatures are composed the same way (the norm's parameters around the scheme's), so the
schemas that ``torch.library.infer_schema`` derives from them are too.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import torch

from . import checks, registry
from .gated import check_gated, gated_fake, rms_norm_gated_ref
from .norm import empty_out, fused_add_rms_norm_ref, rms_norm_ref
from .quant import SCHEMES, QuantScheme
from .spec import Kind, OpSpec, op_name


def _as_tuple(outputs: Any) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


# The gated norm's parameters renamed in its fused ops (a scheme may have one of that name).
GATED_RENAMES = {"group_size": "norm_group_size"}


def _signature(norm_ref, scheme: QuantScheme, extra_output: bool,
               renames: dict[str, str] | None = None) -> inspect.Signature:
    """``norm_ref``'s parameters (``renames`` applied) with the scheme's inserted after
    ``eps``; the scheme's outputs (plus ``residual_out``) as the return annotation."""
    norm = [p.replace(name=(renames or {}).get(p.name, p.name))
            for p in inspect.signature(norm_ref, eval_str=True).parameters.values()]
    at = [p.name for p in norm].index("eps") + 1
    scheme_params = list(inspect.signature(scheme.reference, eval_str=True).parameters.values())[1:]
    returns = inspect.signature(scheme.reference, eval_str=True).return_annotation
    outs = list(typing.get_args(returns)) if typing.get_origin(returns) is tuple else [returns]
    if extra_output:
        outs.append(torch.Tensor)
    ret = outs[0] if len(outs) == 1 else tuple[tuple(outs)]
    return inspect.Signature(norm[:at] + scheme_params + norm[at:], return_annotation=ret)


def _fused_spec(scheme: QuantScheme, residual: bool) -> OpSpec:
    kind = Kind.ADD_NORM_QUANT if residual else Kind.NORM_QUANT
    name = op_name(kind, scheme.name)
    spec: OpSpec

    def reference(*args, **kwargs):
        call = spec.split(spec.bind(args, kwargs))
        norm_args = (call.weight, call.eps, call.weight_offset, call.variance_size)
        if not residual:
            return scheme.reference(rms_norm_ref(call.x, *norm_args), *call.qargs)
        y, residual_out = fused_add_rms_norm_ref(call.x, call.residual, *norm_args)
        return (*_as_tuple(scheme.reference(y, *call.qargs)), residual_out)

    def check(*args):
        call = spec.split(args)
        checks.check_norm_args(name, call.x, call.weight, call.eps, call.weight_offset,
                               call.variance_size)
        if residual:
            checks.check_like(name, "residual", call.residual, call.x)
        scheme.check(name, call.x, *call.qargs)

    def fake(*args):
        call = spec.split(args)
        out = scheme.fake(call.x, *call.qargs)
        return (*_as_tuple(out), empty_out(call.x)) if residual else out

    reference.__name__ = f"{name}_ref"
    reference.__qualname__ = reference.__name__
    reference.__doc__ = (f"(*quant_{scheme.name}(rms_norm(x + residual, ...), ...), x + residual)"
                         if residual else f"quant_{scheme.name}(rms_norm(x, ...), ...)")
    reference.__signature__ = _signature(
        fused_add_rms_norm_ref if residual else rms_norm_ref, scheme, residual)
    outputs = (*scheme.outputs, "residual_out") if residual else scheme.outputs
    spec = OpSpec(kind, reference, check, fake, outputs, scheme)
    return spec


def _gated_spec(scheme: QuantScheme) -> OpSpec:
    name = op_name(Kind.GATED_NORM_QUANT, scheme.name)
    spec: OpSpec

    def gated_args(call):
        return (call.x, call.gate, call.weight, call.eps, call.norm_before_gate, call.norm_group)

    def reference(*args, **kwargs):
        call = spec.split(spec.bind(args, kwargs))
        return scheme.reference(rms_norm_gated_ref(*gated_args(call)), *call.qargs)

    def check(*args):
        call = spec.split(args)
        check_gated(name, *gated_args(call), group_name=GATED_RENAMES["group_size"])
        scheme.check(name, call.x, *call.qargs)

    def fake(*args):
        call = spec.split(args)
        return scheme.fake(gated_fake(*gated_args(call)), *call.qargs)

    reference.__name__ = f"{name}_ref"
    reference.__qualname__ = reference.__name__
    reference.__doc__ = f"quant_{scheme.name}(rms_norm_gated(x, gate, ...), ...)"
    reference.__signature__ = _signature(rms_norm_gated_ref, scheme, False, GATED_RENAMES)
    spec = OpSpec(Kind.GATED_NORM_QUANT, reference, check, fake, scheme.outputs, scheme)
    return spec


FUSED_OPS: dict[str, Any] = {}
for _scheme in SCHEMES.values():
    for _spec in (_fused_spec(_scheme, False), _fused_spec(_scheme, True), _gated_spec(_scheme)):
        _op = registry.declare(_spec)
        FUSED_OPS[_op.name] = _op
globals().update(FUSED_OPS)
__all__ = list(FUSED_OPS)
