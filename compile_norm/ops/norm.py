"""rms_norm, fused_add_rms_norm and rms_norm_add_rms_norm: reference functions (the
specification), ops, autograd.

Numerics (DESIGN.md section 3): statistics in float32 (float64 for float64 input), weight
applied in the weight's dtype when ``weight_offset == 0`` (Hugging Face Llama: round, then
multiply) or as ``weight.float() + weight_offset`` in float32 (Gemma: one rounding at the end);
the output dtype is always ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks, registry
from .spec import Kind, OpSpec


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


def rms_norm_add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    x_weight: torch.Tensor | None,
    x_eps: float,
    weight: torch.Tensor | None,
    eps: float,
    x_weight_offset: float = 0.0,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = rms_norm(x, x_weight, ...) + residual`` (in x.dtype); returns
    ``(rms_norm(h, weight, ...), h)``. Gemma's sandwich: a block's output is normalized
    (post_attention_layernorm), added to the residual stream, and the sum normalized again
    (pre_feedforward_layernorm), all in one pass over the rows."""
    return fused_add_rms_norm_ref(rms_norm_ref(x, x_weight, x_eps, x_weight_offset), residual,
                                  weight, eps, weight_offset)


def rms_norm_backward_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    variance_size: int | None = None,
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight)`` of rms_norm_ref, with the roundings taken as identity.

    ``grad_residual`` (fused_add_rms_norm's gradient of ``residual_out``), if given, is added
    to dx in x.dtype: then dx is the gradient of x and of residual.
    """
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
    dx = dx.to(x.dtype)
    if grad_residual is not None:
        dx = dx + grad_residual
    # contiguous whatever the input strides, as the op's fake (and the kernel) promise
    return dx.contiguous(), dweight


def _check_rms_norm(x, weight, eps, weight_offset=0.0, variance_size=None):
    checks.check_norm_args("rms_norm", x, weight, eps, weight_offset, variance_size)


def _check_fused_add(x, residual, weight, eps, weight_offset=0.0, variance_size=None):
    checks.check_norm_args("fused_add_rms_norm", x, weight, eps, weight_offset, variance_size)
    checks.check_like("fused_add_rms_norm", "residual", residual, x)


def _check_norm_add_norm(x, residual, x_weight, x_eps, weight, eps, x_weight_offset=0.0,
                         weight_offset=0.0):
    name = "rms_norm_add_rms_norm"
    checks.check_norm_args(name, x, x_weight, x_eps, x_weight_offset, None,
                           names=("x_weight", "x_eps", "x_weight_offset"))
    checks.check_norm_args(name, x, weight, eps, weight_offset, None)
    checks.check_like(name, "residual", residual, x)


def _check_backward(grad, x, weight, eps, weight_offset=0.0, variance_size=None, grad_residual=None):
    checks.check_norm_args("rms_norm_backward", x, weight, eps, weight_offset, variance_size)
    checks.check_like("rms_norm_backward", "grad", grad, x)
    if grad_residual is not None:
        checks.check_like("rms_norm_backward", "grad_residual", grad_residual, x)


def empty_out(x: torch.Tensor) -> torch.Tensor:
    """An output like ``x``, contiguous whatever x's strides (what every kernel writes)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _norm_backward(grad, x, weight, eps, weight_offset, variance_size, grad_residual=None):
    """``(dx [+ grad_residual], dweight)`` of rms_norm: the registry's provider (a kernel on CUDA)
    for eager calls on plain tensors; the ``rms_norm_backward`` op when traced (AOTAutograd
    traces the backward: stock Inductor inlines the op's reference, the compile_norm backend
    lowers the op node); the reference's ATen ops when the backward itself is differentiated
    (``create_graph=True``: the backward op has no autograd formula)."""
    args = (grad, x, weight, eps, weight_offset, variance_size, grad_residual)
    if registry.needs_grad(args):
        return rms_norm_backward_ref(*args)
    if registry.eager_ready(args):
        return registry.dispatch("rms_norm_backward", *args)
    return torch.ops.compile_norm.rms_norm_backward.default(*args)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, weight_offset, variance_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.norm_args = (eps, weight_offset, variance_size)


def _backward_rms_norm(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dweight = _norm_backward(grad, x, weight, *ctx.norm_args)
    return dx, dweight, None, None, None


def _setup_fused_add(ctx, inputs, output):
    x, residual, weight, eps, weight_offset, variance_size = inputs
    ctx.save_for_backward(output[1], weight)  # h = x + residual
    ctx.norm_args = (eps, weight_offset, variance_size)
    # an unused output's gradient comes as None, not as zeros: the last layer's residual_out
    # feeds nothing, and a zeros grad_residual would be written, then read by the backward
    ctx.set_materialize_grads(False)


def _backward_fused_add(ctx, grad_out, grad_residual_out):
    h, weight = ctx.saved_tensors
    if grad_out is None:  # only residual_out was used: it is x + residual
        return grad_residual_out, grad_residual_out, None, None, None, None
    # the residual's gradient is added inside the backward (one pass over the rows in eager)
    dh, dweight = _norm_backward(grad_out, h, weight, *ctx.norm_args, grad_residual_out)
    return dh, dh, dweight, None, None, None


def _setup_norm_add_norm(ctx, inputs, output):
    x, residual, x_weight, x_eps, weight, eps, x_weight_offset, weight_offset = inputs
    ctx.save_for_backward(x, output[1], x_weight, weight)  # x and h = norm(x) + residual
    ctx.norm_args = ((x_eps, x_weight_offset, None), (eps, weight_offset, None))
    ctx.set_materialize_grads(False)  # as fused_add_rms_norm: an unused output's grad is None


def _backward_norm_add_norm(ctx, grad_out, grad_residual_out):
    # the two norms' backwards in turn: dh (the residual's gradient) is the sum norm's dx with
    # residual_out's gradient added, and the gradient of x's norm output
    x, h, x_weight, weight = ctx.saved_tensors
    x_args, h_args = ctx.norm_args
    dweight = None
    if grad_out is None:
        dh = grad_residual_out
    else:
        dh, dweight = _norm_backward(grad_out, h, weight, *h_args, grad_residual_out)
    if dh is None:
        return (None,) * 8
    dx, dx_weight = _norm_backward(dh, x, x_weight, *x_args)
    return dx, dh, dx_weight, None, dweight, None, None, None


rms_norm = registry.declare(OpSpec(
    Kind.NORM, rms_norm_ref, _check_rms_norm,
    fake=lambda x, *args: empty_out(x),
    outputs=("out",),
    autograd=(_setup_rms_norm, _backward_rms_norm),
))
fused_add_rms_norm = registry.declare(OpSpec(
    Kind.ADD_NORM, fused_add_rms_norm_ref, _check_fused_add,
    fake=lambda x, *args: (empty_out(x), empty_out(x)),
    outputs=("out", "residual_out"),
    autograd=(_setup_fused_add, _backward_fused_add),
))
rms_norm_add_rms_norm = registry.declare(OpSpec(
    Kind.NORM_ADD_NORM, rms_norm_add_rms_norm_ref, _check_norm_add_norm,
    fake=lambda x, *args: (empty_out(x), empty_out(x)),
    outputs=("out", "residual_out"),
    autograd=(_setup_norm_add_norm, _backward_norm_add_norm),
))
# The backward as an op of its own, so eager training dispatches it to a kernel like every
# other op (the autograd formulas above call it; under tracing they use the reference).
rms_norm_backward = registry.declare(OpSpec(
    Kind.BACKWARD, rms_norm_backward_ref, _check_backward,
    fake=lambda grad, x, weight, *args: (
        empty_out(x), None if weight is None else empty_out(weight)),
    outputs=("dx", "dweight"),
))
