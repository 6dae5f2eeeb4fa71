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
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

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


# --- dynamic FP8 scales: how libraries compute them (arguments of the dynamic FP8 schemes) ---

# scale_form: "divide" s = amax / 448, q = sat(y / s), returns s (vLLM's kernels, torchao
# inference); "multiply" s = amax / 448, q = sat(y * reciprocal(s)), returns s (vLLM's native
# quantizer); "inverse" r = 448 * reciprocal(amax) in float64 rounded to float32,
# q = sat(y * r), returns r (torchao float8 training's scale).
SCALE_FORMS = ("divide", "multiply", "inverse")


class FP8Scale(NamedTuple):
    """How a dynamic FP8 scale is computed: the last parameters of every dynamic FP8 scheme
    (fp8_dynamic, fp8_group, fp8_dynamic_tensor), declared here once and appended to each
    scheme's functions by ``fp8_scale_parameters``.

    ``min_scale`` (None: no minimum) clamps the scale after the division or, with
    ``clamp_amax`` (always for "inverse"), amax before it; ``scale_form`` (``SCALE_FORMS``);
    ``scale_in_x_dtype`` rounds ``amax / 448`` to x's dtype (the division done in the
    activation's dtype); ``pow2_inverse`` rounds the inverse scale down to a power of two as
    ``exp2(floor(log2(r)))`` (torchao's ``round_scales_to_power_of_2``)."""

    min_scale: float | None = FP8_MIN_SCALE
    clamp_amax: bool = False
    scale_form: str = "divide"
    scale_in_x_dtype: bool = False
    pow2_inverse: bool = False


_SCALE_PARAMETERS = tuple(
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      default=FP8Scale._field_defaults[name], annotation=hint)
    for name, hint in typing.get_type_hints(FP8Scale).items())


def fp8_scale_parameters(fn: Callable) -> Callable:
    """``fn(<own parameters>, *, how: FP8Scale)`` as a function of its own parameters followed
    by FP8Scale's fields (the signature ``infer_schema``, the spec and the kernels read).
    Providers call positionally with every argument: that path builds the record only."""
    sig = inspect.signature(fn, eval_str=True)
    *own, how = sig.parameters.values()
    assert how.name == "how" and how.kind == inspect.Parameter.KEYWORD_ONLY, fn
    n, full = len(own), len(own) + len(_SCALE_PARAMETERS)
    signature = sig.replace(parameters=[*own, *_SCALE_PARAMETERS])

    @functools.wraps(fn)
    def with_scale(*args, **kwargs):
        if kwargs or len(args) != full:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        return fn(*args[:n], how=FP8Scale(*args[n:]))

    with_scale.__signature__ = signature
    # not a wrapper to unwrap: FX's tracer reads the innermost function's code for its
    # parameters (inspect.unwrap), which are fn's own and ``how``, not the op's
    del with_scale.__wrapped__
    return with_scale


def fp8_scale_options(options: dict) -> dict:
    """The scale arguments of a test case's options (``QuantScheme.options`` holds
    ``FP8Scale()._asdict()``)."""
    return {name: options[name] for name in FP8Scale._fields}


def fp8_dynamic_scale(amax: torch.Tensor, x_dtype: torch.dtype, how: FP8Scale) -> torch.Tensor:
    """The scale (the inverse scale for "inverse") of the fp32 ``amax`` of values of ``x_dtype``."""
    if how.scale_form == "inverse":  # torchao's amax_to_scale: float64, then float32
        a = amax.double()
        if how.min_scale is not None:
            a = a.clamp(min=how.min_scale)
        scale = (FP8_MAX * torch.reciprocal(a)).float()
        return torch.exp2(torch.floor(torch.log2(scale))) if how.pow2_inverse else scale
    if how.min_scale is not None and how.clamp_amax:
        amax = amax.clamp(min=how.min_scale)
    scale = amax / FP8_MAX
    if how.scale_in_x_dtype:
        scale = scale.to(x_dtype).float()
    if how.min_scale is not None and not how.clamp_amax:
        scale = scale.clamp(min=how.min_scale)
    return scale


def fp8_apply_scale(y: torch.Tensor, scale: torch.Tensor, scale_form: str) -> torch.Tensor:
    """``q`` of the float32 ``y`` for a scale from ``fp8_dynamic_scale`` (broadcast to y), or
    a static one: ``y / s``, ``y * reciprocal(s)``, ``y * r``."""
    if scale_form == "divide":
        return saturate_fp8(y / scale)
    return saturate_fp8(y * (scale if scale_form == "inverse" else torch.reciprocal(scale)))


def check_scale_form(op: str, scale_form: Any) -> None:
    if scale_form not in SCALE_FORMS:
        raise ValueError(f"compile_norm.{op}: scale_form must be one of {SCALE_FORMS}, "
                         f"got {scale_form!r}")


def check_fp8_scale_args(op: str, how: FP8Scale) -> None:
    min_scale, scale_form = how.min_scale, how.scale_form
    if min_scale is not None and not (isinstance(min_scale, (int, float))
                                      and not isinstance(min_scale, bool) and min_scale > 0):
        raise ValueError(f"compile_norm.{op}: min_scale must be a positive float or None, "
                         f"got {min_scale!r}")
    check_scale_form(op, scale_form)
    if scale_form == "inverse" and min_scale is not None and not how.clamp_amax:
        raise ValueError(f"compile_norm.{op}: scale_form='inverse' clamps amax: "
                         f"pass clamp_amax=True with min_scale")
    if scale_form == "inverse" and how.scale_in_x_dtype:
        raise ValueError(f"compile_norm.{op}: scale_in_x_dtype applies to amax / 448, "
                         f"not to scale_form='inverse'")
    if how.pow2_inverse and scale_form != "inverse":
        raise ValueError(f"compile_norm.{op}: pow2_inverse rounds the inverse scale: it needs "
                         f"scale_form='inverse', got {scale_form!r}")


@functools.lru_cache(maxsize=256)  # on the eager hot path: the float32 roundings cost ~4 us
def fp8_kernel_scale(how: FP8Scale) -> Mapping[str, Any]:
    """``KernelQuant`` fields of the scale arguments (the kernel's constexprs).

    The kernel computes "inverse" in float32: ``448 / amax`` correctly rounded equals the
    float64 ``448 * (1 / amax)`` rounded to float32 (a quotient of two floats is never
    within 2**-49 of a float32 rounding boundary, the float64 error is below 2**-52). Its
    float64 clamp becomes ``amax < min_at -> inv_min``, with ``min_at`` the least float32
    >= min_scale (the amaxes below min_scale) and ``inv_min`` torchao's constant.
    ``pow2_inverse`` is the kernel's scale form 3. Read-only: the result is cached."""
    return MappingProxyType(_kernel_scale(how))


def _kernel_scale(how: FP8Scale) -> dict:
    min_scale, scale_form = how.min_scale, how.scale_form
    form = 3 if how.pow2_inverse else SCALE_FORMS.index(scale_form)
    if min_scale is None:
        return dict(scale_form=form, min_at=0, min_value=0.0, inv_min=0.0,
                    scale_in_x_dtype=how.scale_in_x_dtype)
    if scale_form == "inverse":
        at = torch.tensor(min_scale, dtype=torch.float64).float()
        if at.double().item() < min_scale:
            at = torch.nextafter(at, torch.tensor(float("inf")))
        inv = torch.tensor(FP8_MAX * (1.0 / min_scale), dtype=torch.float64).float()
        return dict(scale_form=form, min_at=2, min_value=at.item(), inv_min=inv.item(),
                    scale_in_x_dtype=False)
    value = torch.tensor(min_scale, dtype=torch.float32).item()  # as clamp rounds it
    return dict(scale_form=form, min_at=2 if how.clamp_amax else 1, min_value=value,
                inv_min=0.0, scale_in_x_dtype=how.scale_in_x_dtype)


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
    # dynamic FP8 scale arithmetic (fp8_kernel_scale): SCALE_FORMS index (3: "inverse"
    # rounded down to a power of two); where the minimum
    # applies (0 none, 1 the scale, 2 amax); its float32 value; "inverse": 448 / minimum
    scale_form: int = 0
    min_at: int = 1
    min_value: float = FP8_MIN_SCALE
    inv_min: float = 0.0
    scale_in_x_dtype: bool = False


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
