"""FP8 e4m3, dynamic per-token scale: ``scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))``."""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, KernelQuant, QuantScheme, empty_q,
                     empty_rows, f32, saturate_fp8)


def reference(
    x: torch.Tensor, scale_ub: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.reshape(()))
    scale = torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE)
    return saturate_fp8(y / scale), scale


def check(op, x, scale_ub=None):
    if scale_ub is not None:
        checks.check_scale(op, "scale_ub", scale_ub, x)


SCHEME = QuantScheme(
    name="fp8_dynamic",
    reference=reference,
    outputs=("q", "scale"),
    fake=lambda x, scale_ub=None: (empty_q(x, FP8_DTYPE), empty_rows(x)),
    check=check,
    kernel=lambda x, scale_ub=None: KernelQuant(aux=scale_ub),
    options={"scale_ub": False},
    example_args=lambda options, device: dict(
        scale_ub=torch.tensor(3.0, dtype=torch.float32, device=device)
        if options["scale_ub"] else None),
    variants=({"scale_ub": True},),
)
