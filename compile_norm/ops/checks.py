"""Argument validation shared by every op's fake (tracing) and eager implementation.

Each check raises ``ValueError`` whose message starts with ``compile_norm.<op>:`` and names the
argument and what was expected, so the same clear error appears in eager code and under
torch.compile.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op: str, message: str) -> None:
    raise ValueError(f"compile_norm.{op}: {message}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_input(op: str, x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        fail(op, f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        fail(
            op,
            f"{name} must be float16, bfloat16, float32 or float64, got {_dtype_name(x.dtype)}",
        )
    if x.dim() < 1:
        fail(op, f"{name} must have at least one dimension (the hidden size), got a scalar")


def check_like(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t`` must match ``x`` in shape, dtype and device (a residual)."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        fail(op, f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        fail(op, f"{name} must have the dtype of x ({_dtype_name(x.dtype)}), got {_dtype_name(t.dtype)}")
    check_device(op, name, t, x)


def check_device(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        fail(op, f"{name} must be on the device of x ({x.device}), got {t.device}")


def check_norm_args(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    variance_size: int | None,
    names: tuple[str, str, str] = ("weight", "eps", "weight_offset"),
) -> None:
    """``names``: what the op calls its weight, eps and weight offset (an op with two norms
    has two sets)."""
    check_input(op, x)
    w_name, eps_name, offset_name = names
    hidden = x.shape[-1]
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            fail(op, f"{w_name} must be a Tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != hidden:
            fail(
                op,
                f"{w_name} must have shape ({hidden},) to match x.shape[-1], got {tuple(weight.shape)}",
            )
        if weight.dtype not in FLOAT_DTYPES:
            fail(op, f"{w_name} must be a floating-point tensor, got {_dtype_name(weight.dtype)}")
        check_device(op, w_name, weight, x)
    elif weight_offset != 0.0:
        fail(op, f"{offset_name}={weight_offset} needs a weight; {w_name} is None")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        fail(op, f"{eps_name} must be a finite float >= 0, got {eps!r}")
    if not isinstance(weight_offset, (int, float)) or not math.isfinite(weight_offset):
        fail(op, f"{offset_name} must be a finite float, got {weight_offset!r}")
    if variance_size is not None and not 1 <= variance_size <= hidden:
        fail(op, f"variance_size must be None or in [1, {hidden}] (x.shape[-1]), got {variance_size}")


def check_scalar_tensor(
    op: str, name: str, t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype
) -> None:
    """A per-tensor scale / zero point: one element of ``dtype`` on the device of x."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a one-element {_dtype_name(dtype)} Tensor, got {type(t).__name__}")
    if t.numel() != 1:
        fail(op, f"{name} must have exactly one element (per-tensor), got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        fail(op, f"{name} must be {_dtype_name(dtype)}, got {_dtype_name(t.dtype)}")
    check_device(op, name, t, x)


def check_group_size(op: str, x: torch.Tensor, group_size: int, name: str = "group_size") -> None:
    hidden = x.shape[-1]
    if not isinstance(group_size, int) or group_size <= 0:
        fail(op, f"{name} must be a positive int, got {group_size!r}")
    if hidden % group_size != 0:
        fail(op, f"{name}={group_size} must divide the hidden size x.shape[-1]={hidden}")



def check_scale(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """A static scale (or scale bound): one float32 element, a finite number > 0 (a scale of 0
    turns every code into inf / NaN, a negative one flips the signs). The value is read only
    where that is free, a plain CPU tensor: on CUDA reading it would wait for the device on
    every call, and a traced (fake) tensor has no value."""
    check_scalar_tensor(op, name, t, x, torch.float32)
    if type(t) is torch.Tensor and t.device.type == "cpu":
        value = t.item()
        if not (value > 0 and math.isfinite(value)):
            fail(op, f"{name} must be a finite number > 0, got {value!r}")
