"""Activation quantization: FP8 e4m3 and INT8 schemes, their reference functions and ops.

Each scheme is declared once as a ``QuantScheme``: its extra arguments, outputs, reference,
argument check and fake. ``quant_<scheme>(x, ...)`` is declared here; ``fused.py`` builds the
norm + quantization ops from the same schemes, so the fused ops are by construction the
composition of their parts.

All math is in float32 on the value as the model sees it (``x`` already in its own dtype).
Outputs are contiguous (and the column-major group scales column-major) whatever the strides
of ``x``, as the fake implementations promise.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import checks, registry

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Smallest dynamic FP8 scale: keeps all-zero rows finite (as vLLM does).
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
INT8_MIN = -128
INT8_MAX = 127
# Smallest dynamic INT8 scale: an all-zero row gets a finite scale and quantizes to zero.
INT8_MIN_SCALE = 1e-10


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def _saturate_fp8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _saturate_int8(v: torch.Tensor) -> torch.Tensor:
    # INT8 has no NaN: a NaN maps to 0 (explicitly, so every backend agrees).
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    return v.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def row_scale_shape(x: torch.Tensor) -> tuple:
    return (*x.shape[:-1], 1)


def group_scales_empty(x: torch.Tensor, group_size: int, column_major: bool) -> torch.Tensor:
    """Scales ``[*lead, H / group_size]``; column-major stores the token index fastest."""
    lead, groups = tuple(x.shape[:-1]), x.shape[-1] // group_size
    if not column_major:
        return x.new_empty((*lead, groups), dtype=torch.float32)
    t = x.new_empty((groups, *lead), dtype=torch.float32)
    return t.permute(*range(1, len(lead) + 1), 0)


# --- reference functions ---------------------------------------------------------------


def fp8_static_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q = sat(x / scale)``, per-tensor ``scale``."""
    return _saturate_fp8(_f32(x) / scale.reshape(()))


def fp8_dynamic_ref(
    x: torch.Tensor, scale_ub: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token: ``scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))``."""
    y = _f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.reshape(()))
    scale = torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE)
    return _saturate_fp8(y / scale), scale


def fp8_group_ref(
    x: torch.Tensor,
    group_size: int = 128,
    column_major_scales: bool = False,
    use_ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group of ``group_size`` along the last dim; UE8M0 rounds scales up to a power of 2."""
    y = _f32(x)
    groups = y.reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    amax = groups.abs().amax(-1)
    scale = torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE)
    if use_ue8m0:
        pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
        # log2 rounds to an integer just above a power of two (2^k * (1 + 2^-23) -> k):
        # double that case so the scale is never rounded down (q would saturate).
        scale = torch.where(pow2 < scale, pow2 * 2.0, pow2)
    q = _saturate_fp8(groups / scale.unsqueeze(-1)).reshape(y.shape)
    if column_major_scales:  # same strides as group_scales_empty(..., column_major=True)
        nd = scale.dim()
        scale = scale.permute(nd - 1, *range(nd - 1)).contiguous().permute(*range(1, nd), 0)
    return q, scale


def int8_static_ref(
    x: torch.Tensor, scale: torch.Tensor, azp: torch.Tensor | None = None
) -> torch.Tensor:
    """``q = clamp(round_half_even(x / scale) + azp, -128, 127)``."""
    v = torch.round(_f32(x) / scale.reshape(()))
    if azp is not None:
        v = v + azp.reshape(()).float()
    return _saturate_int8(v)


def int8_dynamic_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: ``scale = amax / 127``."""
    y = _f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    scale = torch.clamp(amax / INT8_MAX, min=INT8_MIN_SCALE)
    return _saturate_int8(torch.round(y / scale)), scale


def int8_dynamic_asym_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric: ``scale = (max - min) / 255``, ``azp = round(-128 - min / scale)``."""
    y = _f32(x)
    ymax = y.amax(-1, keepdim=True)
    ymin = y.amin(-1, keepdim=True)
    scale = torch.clamp((ymax - ymin) / 255.0, min=INT8_MIN_SCALE)
    azp_f = torch.round(INT8_MIN - ymin / scale)
    azp_f = torch.where(torch.isnan(azp_f), torch.zeros_like(azp_f), azp_f)
    q = _saturate_int8(torch.round(y / scale) + azp_f)
    return q, scale, azp_f.to(torch.int32)


# --- argument checks and fakes ------------------------------------------------------------


def _check_fp8_static(op, x, scale):
    checks.check_scalar_tensor(op, "scale", scale, x, torch.float32)


def _check_fp8_dynamic(op, x, scale_ub=None):
    if scale_ub is not None:
        checks.check_scalar_tensor(op, "scale_ub", scale_ub, x, torch.float32)


def _check_fp8_group(op, x, group_size=128, column_major_scales=False, use_ue8m0=False):
    checks.check_group_size(op, x, group_size)


def _check_int8_static(op, x, scale, azp=None):
    checks.check_scalar_tensor(op, "scale", scale, x, torch.float32)
    if azp is not None:
        checks.check_scalar_tensor(op, "azp", azp, x, torch.int32)


def _check_none(op, x):
    pass


def _q(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _row(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(row_scale_shape(x), dtype=dtype, device=x.device)


@dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme: its arguments after ``x``, outputs, math, checks and fake."""

    name: str
    args_schema: str  # extra arguments, schema syntax
    outputs: tuple[str, ...]  # names of the outputs, in order
    reference: Callable[..., Any]
    check: Callable[..., None]  # check(op_name, x, *args, **kwargs)
    fake: Callable[..., Any]  # fake(x, *args, **kwargs) -> outputs

    @functools.cached_property
    def _fused_signature(self) -> inspect.Signature:
        params = list(inspect.signature(self.reference).parameters.values())[1:]
        extra = [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
            for n, d in (("weight_offset", 0.0), ("variance_size", None))
        ]
        return inspect.Signature(params + extra)

    def split_args(self, args: tuple, kwargs: dict) -> tuple[tuple, float, int | None]:
        """Split a fused op's arguments after ``eps`` into (scheme args, weight_offset,
        variance_size). The dispatcher passes them all positionally (the fast path)."""
        n = len(self._fused_signature.parameters) - 2
        if not kwargs and len(args) == n + 2:
            return args[:n], args[n], args[n + 1]
        bound = self._fused_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = tuple(bound.arguments.values())
        return values[:n], values[n], values[n + 1]

    @property
    def returns_schema(self) -> str:
        if len(self.outputs) == 1:
            return "Tensor"
        return "(" + ", ".join("Tensor" for _ in self.outputs) + ")"


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme(
            "fp8_static",
            "Tensor scale",
            ("q",),
            fp8_static_ref,
            _check_fp8_static,
            lambda x, scale: _q(x, FP8_DTYPE),
        ),
        QuantScheme(
            "fp8_dynamic",
            "Tensor? scale_ub=None",
            ("q", "scale"),
            fp8_dynamic_ref,
            _check_fp8_dynamic,
            lambda x, scale_ub=None: (_q(x, FP8_DTYPE), _row(x)),
        ),
        QuantScheme(
            "fp8_group",
            "int group_size=128, bool column_major_scales=False, bool use_ue8m0=False",
            ("q", "scales"),
            fp8_group_ref,
            _check_fp8_group,
            lambda x, group_size=128, column_major_scales=False, use_ue8m0=False: (
                _q(x, FP8_DTYPE),
                group_scales_empty(x, group_size, column_major_scales),
            ),
        ),
        QuantScheme(
            "int8_static",
            "Tensor scale, Tensor? azp=None",
            ("q",),
            int8_static_ref,
            _check_int8_static,
            lambda x, scale, azp=None: _q(x, torch.int8),
        ),
        QuantScheme(
            "int8_dynamic",
            "",
            ("q", "scale"),
            int8_dynamic_ref,
            _check_none,
            lambda x: (_q(x, torch.int8), _row(x)),
        ),
        QuantScheme(
            "int8_dynamic_asym",
            "",
            ("q", "scale", "azp"),
            int8_dynamic_asym_ref,
            _check_none,
            lambda x: (_q(x, torch.int8), _row(x), _row(x, torch.int32)),
        ),
    )
}


def quant_op_name(scheme: str) -> str:
    return f"quant_{scheme}"


def _declare_quant(scheme: QuantScheme) -> Any:
    name = quant_op_name(scheme.name)

    def check(x, *args, **kwargs):
        checks.check_input(name, x)
        scheme.check(name, x, *args, **kwargs)

    args = f", {scheme.args_schema}" if scheme.args_schema else ""
    return registry.declare_op(
        name,
        scheme.reference,
        schema=f"(Tensor x{args}) -> {scheme.returns_schema}",
        fake=scheme.fake,
        check=check,
    )


QUANT_OPS: dict[str, Any] = {s: _declare_quant(scheme) for s, scheme in SCHEMES.items()}
quant_fp8_static = QUANT_OPS["fp8_static"]
quant_fp8_dynamic = QUANT_OPS["fp8_dynamic"]
quant_fp8_group = QUANT_OPS["fp8_group"]
quant_int8_static = QUANT_OPS["int8_static"]
quant_int8_dynamic = QUANT_OPS["int8_dynamic"]
quant_int8_dynamic_asym = QUANT_OPS["int8_dynamic_asym"]
