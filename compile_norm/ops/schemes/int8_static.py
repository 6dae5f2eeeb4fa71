"""INT8, static per-tensor scale and optional zero point:
``q = clamp(round_half_even(x / scale) + azp, -128, 127)``."""

from __future__ import annotations

import torch

from .. import checks
from ..quant import KernelQuant, QuantScheme, empty_q, f32, saturate_int8


def reference(
    x: torch.Tensor, scale: torch.Tensor, azp: torch.Tensor | None = None
) -> torch.Tensor:
    v = torch.round(f32(x) / scale.reshape(()))
    if azp is not None:
        v = v + azp.reshape(()).float()
    return saturate_int8(v)


def check(op, x, scale, azp=None):
    checks.check_scale(op, "scale", scale, x)
    if azp is not None:
        checks.check_scalar_tensor(op, "azp", azp, x, torch.int32)


SCHEME = QuantScheme(
    name="int8_static",
    reference=reference,
    outputs=("q",),
    fake=lambda x, scale, azp=None: empty_q(x, torch.int8),
    check=check,
    kernel=lambda x, scale, azp=None: KernelQuant(scale=scale, aux=azp),
    options={"azp": False},
    example_args=lambda options, device: dict(
        scale=torch.tensor(3.5 / 127.0, dtype=torch.float32, device=device),
        azp=torch.tensor(3, dtype=torch.int32, device=device) if options["azp"] else None),
    variants=({"azp": True},),
)
