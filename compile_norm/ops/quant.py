"""Activation quantization: the ``QuantScheme`` record, shared math, and the ``quant_<s>`` ops.

Each scheme lives in its own file under ``ops/schemes/`` and declares one ``SCHEME``: its
annotated reference ``(x, <scheme args>) -> outputs``, argument check, fake, the Triton
kernel's configuration for a call, and its test cases. Schemes are found by listing that
folder: adding one touches its own file, the kernel code and its tests, nothing else.
``quant_<s>`` is declared here; ``fused.py`` builds the norm + quantization ops from the same
schemes, so the fused ops are by construction the composition of their parts.

All math is in float32 on the value as the model sees it (``x`` already in its own dtype).
Outputs are contiguous (and column-major group scales column-major) whatever the strides of
``x``, as the fake implementations promise.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from . import checks, registry
from .spec import Kind, OpSpec

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Smallest dynamic FP8 scale: keeps all-zero rows finite (as vLLM does).
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
INT8_MIN = -128
INT8_MAX = 127
# Smallest dynamic INT8 scale: an all-zero row gets a finite scale and quantizes to zero.
INT8_MIN_SCALE = 1e-10


# --- math shared by the schemes ---------------------------------------------------------------


def f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def saturate_fp8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def saturate_int8(v: torch.Tensor) -> torch.Tensor:
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


def empty_q(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def empty_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(row_scale_shape(x), dtype=dtype, device=x.device)


def no_check(op: str, x: torch.Tensor, *args: Any) -> None:
    pass


# --- the scheme record ------------------------------------------------------------------------


class KernelQuant(NamedTuple):
    """What the Triton kernel needs of one call's scheme arguments (besides the scheme)."""

    scale: torch.Tensor | None = None  # static per-tensor scale
    aux: torch.Tensor | None = None  # scale_ub (FP8 dynamic) or azp (INT8 static)
    group: int = 0  # per-group: group size
    column_major: bool = False
    ue8m0: bool = False
    mx_scale: int = 0  # MXFP8: the kernel's scale mode (schemes/mxfp8.SCALING_MODES)


@dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme.

    ``reference(x, *args)`` is annotated (its parameters after ``x`` become every op's scheme
    arguments); ``check(op, x, *args)`` raises naming the argument; ``fake(x, *args)``;
    ``kernel(x, *args)`` returns the Triton kernel's ``KernelQuant`` or None where the kernel
    cannot reproduce the call (None as the field: no kernel for the scheme).
    ``options`` / ``example_args(options, device)`` / ``variants``: the test cases of
    ``kernels/checking.py`` (options with defaults; the scheme arguments they give; extra
    option sets worth a case each; a ``"shape"`` entry maps (tokens, hidden) to the case's
    shape).
    """

    name: str
    reference: Callable[..., Any]
    outputs: tuple[str, ...]
    fake: Callable[..., Any]
    check: Callable[..., None] = no_check
    kernel: Callable[..., KernelQuant | None] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    example_args: Callable[[dict, Any], dict] = lambda options, device: {}
    variants: tuple[dict, ...] = ()
    input_shift: float = 0.0  # test inputs are randn + this

    @functools.cached_property
    def parameters(self) -> tuple[inspect.Parameter, ...]:
        return tuple(inspect.signature(self.reference).parameters.values())[1:]


def _load_schemes() -> dict[str, QuantScheme]:
    from . import schemes

    found = {}
    for info in sorted(pkgutil.iter_modules(schemes.__path__), key=lambda m: m.name):
        scheme = importlib.import_module(f"{schemes.__name__}.{info.name}").SCHEME
        if scheme.name != info.name:
            raise ValueError(f"compile_norm: scheme file {info.name}.py declares {scheme.name!r}")
        found[scheme.name] = scheme
    return found


SCHEMES: dict[str, QuantScheme] = _load_schemes()


def _quant_spec(scheme: QuantScheme) -> OpSpec:
    def check(x, *args):
        op = f"quant_{scheme.name}"
        checks.check_input(op, x)
        scheme.check(op, x, *args)

    return OpSpec(Kind.QUANT, scheme.reference, check, scheme.fake, scheme.outputs, scheme)


QUANT_OPS: dict[str, Any] = {s: registry.declare(_quant_spec(scheme)) for s, scheme in SCHEMES.items()}
globals().update({op.name: op for op in QUANT_OPS.values()})
__all__ = [op.name for op in QUANT_OPS.values()]
