"""rms_norm_gated: RMSNorm with a SiLU gate, in the two orders models use.

``rms_norm_gated(x, gate, weight, eps, norm_before_gate=True, group_size=None)``:

- ``norm_before_gate=True`` (Qwen3-Next / Qwen3.5, transformers' ``Qwen3NextRMSNormGated``):
  ``(rms_norm(x, weight, eps).float() * silu(gate.float())).to(x.dtype)``; the norm is
  ``rms_norm_ref`` itself, so a graph whose norm the canonicalize pass made ``rms_norm`` and
  whose gate follows is this op bit for bit. No groups.
- ``norm_before_gate=False`` (Mamba-2 / Falcon-H1, transformers' ``Mamba2RMSNormGated``,
  formerly ``MambaRMSNormGated``): the gate first, ``z = x.float() * silu(gate.float())``,
  RMSNorm of ``z`` over groups of ``group_size`` columns (None: the whole row), then
  ``weight * y.to(x.dtype)`` in the promoted dtype, as that class writes it (a float32 weight
  gives a float32 output).

The backward is the formula of those references (roundings taken as identity, float32), in
ATen ops: traced under compile, Inductor generates it. The forward has the row kernel's
Triton provider (kernels/triton_kernel.py, its ``GATE`` stage); ``rms_norm_gated_<scheme>``
(ops/fused.py) is this op followed by a quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks, registry
from .norm import compute_dtype, empty_out, rms_norm_ref
from .spec import Kind, OpSpec

OP = "rms_norm_gated"


def _groups(t: torch.Tensor, group_size: int | None) -> torch.Tensor:
    h = t.shape[-1]
    g = group_size or h
    return t.reshape(*t.shape[:-1], h // g, g)


def rms_norm_gated_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    norm_before_gate: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """RMSNorm of ``x`` gated by ``silu(gate)``: after the norm (Qwen3-Next) or before it
    (Mamba-2, per group of ``group_size``)."""
    cd = compute_dtype(x.dtype)  # float32 (float64 for float64 x, so gradcheck is exact)
    act = F.silu(gate.to(cd))
    # (contiguous outputs whatever the input strides, as the fake promises)
    if norm_before_gate:
        return (rms_norm_ref(x, weight, eps).to(cd) * act).to(x.dtype).contiguous()
    z = _groups((x.to(cd) * act).contiguous(), group_size)
    y = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape).to(x.dtype)
    return y if weight is None else (weight * y).contiguous()


def check_gated(op, x, gate, weight, eps, norm_before_gate, group_size, group_name="group_size"):
    """The gated norm's arguments (``group_name``: what ``op`` calls the norm's group size)."""
    checks.check_norm_args(op, x, weight, eps, 0.0, None)
    checks.check_like(op, "gate", gate, x)
    if not isinstance(norm_before_gate, bool):
        checks.fail(op, f"norm_before_gate must be a bool, got {norm_before_gate!r}")
    if group_size is not None:
        if norm_before_gate:
            checks.fail(op, f"{group_name} is only for the gate before the norm (norm_before_gate=False)")
        checks.check_group_size(op, x, group_size, group_name)


def _check(x, gate, weight, eps, norm_before_gate=True, group_size=None):
    check_gated(OP, x, gate, weight, eps, norm_before_gate, group_size)


def out_dtype(x, weight, norm_before_gate):
    """The output dtype: x.dtype, or with the gate before the norm the weight's promotion."""
    if norm_before_gate or weight is None:
        return x.dtype
    return torch.promote_types(weight.dtype, x.dtype)


def gated_fake(x, gate, weight, eps, norm_before_gate=True, group_size=None):
    return empty_out(x).to(out_dtype(x, weight, norm_before_gate))


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def _norm_grad(dn: torch.Tensor, n: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d(input) of ``n = input * rstd`` (grouped) given ``dn``."""
    return rstd * (dn - n * (dn * n).mean(-1, keepdim=True))


def rms_norm_gated_backward(grad, x, gate, weight, eps, norm_before_gate, group_size):
    """``(dx, dgate, dweight)`` of rms_norm_gated_ref in float32 (roundings as identity)."""
    cd = compute_dtype(x.dtype)  # float64 input: float64 (gradcheck), else float32
    gf, xf, gr = gate.to(cd), x.to(cd), grad.to(cd)
    act = F.silu(gf)
    w = None if weight is None else weight.to(cd)
    if norm_before_gate:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        n = xf * rstd
        u = n if w is None else n * w
        du = gr * act
        dgate = gr * u * _silu_grad(gf)
        dweight = None if w is None else (du * n).reshape(-1, x.shape[-1]).sum(0)
        dx = _norm_grad(du if w is None else du * w, n, rstd)
    else:
        z = _groups(xf * act, group_size)
        rstd = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
        n = z * rstd
        dn = _groups(gr if w is None else gr * w, group_size)
        dweight = None if w is None else (gr * n.reshape(x.shape)).reshape(-1, x.shape[-1]).sum(0)
        dz = _norm_grad(dn, n, rstd).reshape(x.shape)
        dx = dz * act
        dgate = dz * xf * _silu_grad(gf)
    return (dx.to(x.dtype), dgate.to(gate.dtype),
            None if weight is None else dweight.to(weight.dtype))


def _setup(ctx, inputs, output):
    x, gate, weight, eps, norm_before_gate, group_size = inputs
    ctx.save_for_backward(x, gate, weight)
    ctx.args = (eps, norm_before_gate, group_size)


def _backward(ctx, grad):
    x, gate, weight = ctx.saved_tensors
    dx, dgate, dweight = rms_norm_gated_backward(grad, x, gate, weight, *ctx.args)
    return dx, dgate, dweight, None, None, None


rms_norm_gated = registry.declare(OpSpec(
    Kind.GATED_NORM, rms_norm_gated_ref, _check, fake=gated_fake, outputs=("out",),
    autograd=(_setup, _backward),
))
