"""FP8 e4m3, static per-tensor scale: ``q = sat(x / scale)``."""

from __future__ import annotations

import torch

from .. import checks
from ..quant import FP8_DTYPE, KernelQuant, QuantScheme, empty_q, f32, saturate_fp8


def reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return saturate_fp8(f32(x) / scale.reshape(()))


def check(op, x, scale):
    checks.check_scale(op, "scale", scale, x)


SCHEME = QuantScheme(
    name="fp8_static",
    reference=reference,
    outputs=("q",),
    fake=lambda x, scale: empty_q(x, FP8_DTYPE),
    check=check,
    kernel=lambda x, scale: KernelQuant(scale=scale),
    example_args=lambda options, device: dict(
        scale=torch.tensor(3.5 / 448.0, dtype=torch.float32, device=device)),
)
