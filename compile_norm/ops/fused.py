"""Norm + quantization ops, built from the norm ops and the quantization schemes.

For each scheme ``s`` of ``quant.SCHEMES``:

- ``rms_norm_<s>(x, weight, eps, <scheme args>, weight_offset=0.0, variance_size=None)``
  returns the scheme's outputs of ``quant_<s>(rms_norm(x, ...), ...)``;
- ``fused_add_rms_norm_<s>(x, residual, weight, eps, <scheme args>, weight_offset=0.0,
  variance_size=None)`` returns those outputs followed by ``residual_out = x + residual``.

The scheme arguments come right after ``eps`` (custom ops allow no keyword-only Tensor), so
pass them, and the optional norm arguments, by keyword for readable call sites.
The references are literal compositions of the parts: fused equals composed, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from . import checks, registry
from .norm import fused_add_rms_norm_ref, rms_norm_ref
from .quant import SCHEMES, QuantScheme


def norm_op_name(scheme: str) -> str:
    return f"rms_norm_{scheme}"


def add_norm_op_name(scheme: str) -> str:
    return f"fused_add_rms_norm_{scheme}"


def _as_tuple(outputs: Any) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _declare_pair(scheme: QuantScheme) -> tuple[Any, Any]:
    norm_name, add_name = norm_op_name(scheme.name), add_norm_op_name(scheme.name)
    quant_args = f"{scheme.args_schema}, " if scheme.args_schema else ""
    norm_args = f"Tensor? weight, float eps, {quant_args}float weight_offset=0.0, SymInt? variance_size=None"

    # Positional calls carry the scheme's arguments between eps and weight_offset.
    split = scheme.split_args

    def norm_ref(x, weight, eps, *args, **kwargs):
        quant_args, offset, variance_size = split(args, kwargs)
        y = rms_norm_ref(x, weight, eps, offset, variance_size)
        return scheme.reference(y, *quant_args)

    def add_ref(x, residual, weight, eps, *args, **kwargs):
        quant_args, offset, variance_size = split(args, kwargs)
        y, residual_out = fused_add_rms_norm_ref(x, residual, weight, eps, offset, variance_size)
        return (*_as_tuple(scheme.reference(y, *quant_args)), residual_out)

    def norm_check(x, weight, eps, *args, **kwargs):
        quant_args, offset, variance_size = split(args, kwargs)
        checks.check_norm_args(norm_name, x, weight, eps, offset, variance_size)
        scheme.check(norm_name, x, *quant_args)

    def add_check(x, residual, weight, eps, *args, **kwargs):
        quant_args, offset, variance_size = split(args, kwargs)
        checks.check_norm_args(add_name, x, weight, eps, offset, variance_size)
        checks.check_like(add_name, "residual", residual, x)
        scheme.check(add_name, x, *quant_args)

    def norm_fake(x, weight, eps, *args, **kwargs):
        quant_args, _, _ = split(args, kwargs)
        return scheme.fake(x, *quant_args)

    def add_fake(x, residual, weight, eps, *args, **kwargs):
        quant_args, _, _ = split(args, kwargs)
        out = _as_tuple(scheme.fake(x, *quant_args))
        return (*out, torch.empty_like(x, memory_format=torch.contiguous_format))

    norm_ref.__name__ = f"{norm_name}_ref"
    add_ref.__name__ = f"{add_name}_ref"
    norm_ref.__doc__ = f"quant_{scheme.name}(rms_norm(x, ...), ...)"
    add_ref.__doc__ = f"(*quant_{scheme.name}(rms_norm(x + residual, ...), ...), x + residual)"
    add_returns = "(" + ", ".join(["Tensor"] * (len(scheme.outputs) + 1)) + ")"
    norm_op = registry.declare_op(
        norm_name,
        norm_ref,
        schema=f"(Tensor x, {norm_args}) -> {scheme.returns_schema}",
        fake=norm_fake,
        check=norm_check,
    )
    add_op = registry.declare_op(
        add_name,
        add_ref,
        schema=f"(Tensor x, Tensor residual, {norm_args}) -> {add_returns}",
        fake=add_fake,
        check=add_check,
    )
    return norm_op, add_op


FUSED_OPS: dict[str, Any] = {}
for _scheme in SCHEMES.values():
    FUSED_OPS[norm_op_name(_scheme.name)], FUSED_OPS[add_norm_op_name(_scheme.name)] = (
        _declare_pair(_scheme)
    )

rms_norm_fp8_static = FUSED_OPS["rms_norm_fp8_static"]
rms_norm_fp8_dynamic = FUSED_OPS["rms_norm_fp8_dynamic"]
rms_norm_fp8_group = FUSED_OPS["rms_norm_fp8_group"]
rms_norm_int8_static = FUSED_OPS["rms_norm_int8_static"]
rms_norm_int8_dynamic = FUSED_OPS["rms_norm_int8_dynamic"]
rms_norm_int8_dynamic_asym = FUSED_OPS["rms_norm_int8_dynamic_asym"]
fused_add_rms_norm_fp8_static = FUSED_OPS["fused_add_rms_norm_fp8_static"]
fused_add_rms_norm_fp8_dynamic = FUSED_OPS["fused_add_rms_norm_fp8_dynamic"]
fused_add_rms_norm_fp8_group = FUSED_OPS["fused_add_rms_norm_fp8_group"]
fused_add_rms_norm_int8_static = FUSED_OPS["fused_add_rms_norm_int8_static"]
fused_add_rms_norm_int8_dynamic = FUSED_OPS["fused_add_rms_norm_int8_dynamic"]
fused_add_rms_norm_int8_dynamic_asym = FUSED_OPS["fused_add_rms_norm_int8_dynamic_asym"]
