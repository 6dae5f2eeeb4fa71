"""INT8, dynamic per-token symmetric scale: ``scale = amax / 127``."""

from __future__ import annotations

import torch

from ..quant import (INT8_MAX, INT8_MIN_SCALE, KernelQuant, QuantScheme, empty_q, empty_rows, f32,
                     saturate_int8)


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    scale = torch.clamp(amax / INT8_MAX, min=INT8_MIN_SCALE)
    return saturate_int8(torch.round(y / scale)), scale


SCHEME = QuantScheme(
    name="int8_dynamic",
    reference=reference,
    outputs=("q", "scale"),
    fake=lambda x: (empty_q(x, torch.int8), empty_rows(x)),
    kernel=lambda x: KernelQuant(),
)
