"""rms_norm and fused_add_rms_norm: reference functions (the specification), ops, autograd.

Numerics (DESIGN.md section 3): statistics in float32 (float64 for float64 input), weight
applied in the weight's dtype when ``weight_offset == 0`` (Hugging Face Llama: round, then
multiply) or as ``weight.float() + weight_offset`` in float32 (Gemma: one rounding at the end);
the output dtype is always ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks, registry

NORM_ARGS_SCHEMA = "Tensor? weight, float eps, float weight_offset=0.0, SymInt? variance_size=None"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 for float64 (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_weight(weight: torch.Tensor, weight_offset: float, dtype: torch.dtype) -> torch.Tensor:
    """The weight the normalized value is multiplied by (Gemma's ``1 + w`` in float32)."""
    if weight_offset == 0.0:
        return weight
    return weight.to(compute_dtype(dtype)) + weight_offset


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    variance_size: int | None = None,
) -> torch.Tensor:
    """RMSNorm of the last dim of ``x``; the variance over the first ``variance_size`` elements."""
    # Contiguous output whatever the input strides, as the fake implementation promises.
    xf = x.to(compute_dtype(x.dtype)).contiguous()
    xv = xf if variance_size is None else xf[..., :variance_size]
    variance = xv.pow(2).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(variance + eps)
    if weight is None:
        return y.to(x.dtype)
    w = effective_weight(weight, weight_offset, x.dtype)
    return (y.to(w.dtype) * w).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (in x.dtype); returns ``(rms_norm(h, ...), h)``."""
    h = (x + residual).contiguous()  # residual_out is contiguous, as the fake promises
    return rms_norm_ref(h, weight, eps, weight_offset, variance_size), h


def rms_norm_backward_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight)`` of rms_norm_ref, with the roundings taken as identity."""
    hidden = x.shape[-1]
    n_var = hidden if variance_size is None else variance_size
    xf = x.to(compute_dtype(x.dtype))
    xv = xf if variance_size is None else xf[..., :n_var]
    rstd = torch.rsqrt(xv.pow(2).mean(-1, keepdim=True) + eps)
    g = grad.to(xf.dtype)
    dweight = None
    if weight is not None:
        w = weight.to(xf.dtype) + weight_offset
        dweight = (g * (xf * rstd)).reshape(-1, hidden).sum(0).to(weight.dtype)
        g = g * w
    # d rstd / d x_j = -rstd^3 x_j / n_var for the columns inside the variance window.
    coef = (g * xf).sum(-1, keepdim=True) * rstd.pow(3) / n_var
    if n_var != hidden:
        xv = F.pad(xv, (0, hidden - n_var))
    dx = g * rstd - xv * coef
    return dx.to(x.dtype), dweight


def _check_rms_norm(x, weight, eps, weight_offset=0.0, variance_size=None):
    checks.check_norm_args("rms_norm", x, weight, eps, weight_offset, variance_size)


def _check_fused_add(x, residual, weight, eps, weight_offset=0.0, variance_size=None):
    checks.check_norm_args("fused_add_rms_norm", x, weight, eps, weight_offset, variance_size)
    checks.check_like("fused_add_rms_norm", "residual", residual, x)


rms_norm = registry.declare_op(
    "rms_norm",
    rms_norm_ref,
    schema=f"(Tensor x, {NORM_ARGS_SCHEMA}) -> Tensor",
    fake=lambda x, *args, **kwargs: torch.empty_like(x, memory_format=torch.contiguous_format),
    check=_check_rms_norm,
)

fused_add_rms_norm = registry.declare_op(
    "fused_add_rms_norm",
    fused_add_rms_norm_ref,
    schema=f"(Tensor x, Tensor residual, {NORM_ARGS_SCHEMA}) -> (Tensor, Tensor)",
    fake=lambda x, *args, **kwargs: (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    ),
    check=_check_fused_add,
)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, weight_offset, variance_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.norm_args = (eps, weight_offset, variance_size)


def _backward_rms_norm(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_backward_ref(grad, x, weight, *ctx.norm_args)
    return dx, dweight, None, None, None


def _setup_fused_add(ctx, inputs, output):
    x, residual, weight, eps, weight_offset, variance_size = inputs
    ctx.save_for_backward(output[1], weight)  # h = x + residual
    ctx.norm_args = (eps, weight_offset, variance_size)


def _backward_fused_add(ctx, grad_out, grad_residual_out):
    h, weight = ctx.saved_tensors
    dh, dweight = rms_norm_backward_ref(grad_out, h, weight, *ctx.norm_args)
    if grad_residual_out is not None:
        dh = dh + grad_residual_out
    return dh, dh, dweight, None, None, None


rms_norm.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
fused_add_rms_norm.register_autograd(_backward_fused_add, setup_context=_setup_fused_add)
