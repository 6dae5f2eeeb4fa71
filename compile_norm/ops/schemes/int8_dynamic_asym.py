"""INT8, dynamic per-token asymmetric: ``scale = (max - min) / 255``,
``azp = round_half_even(-128 - min / scale)``."""

from __future__ import annotations

import torch

from ..quant import (INT8_MIN, INT8_MIN_SCALE, KernelQuant, QuantScheme, empty_q, empty_rows, f32,
                     saturate_int8)


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = f32(x)
    ymax = y.amax(-1, keepdim=True)
    ymin = y.amin(-1, keepdim=True)
    scale = torch.clamp((ymax - ymin) / 255.0, min=INT8_MIN_SCALE)
    azp_f = torch.round(INT8_MIN - ymin / scale)
    azp_f = torch.where(torch.isnan(azp_f), torch.zeros_like(azp_f), azp_f)
    q = saturate_int8(torch.round(y / scale) + azp_f)
    return q, scale, azp_f.to(torch.int32)


SCHEME = QuantScheme(
    name="int8_dynamic_asym",
    reference=reference,
    outputs=("q", "scale", "azp"),
    fake=lambda x: (empty_q(x, torch.int8), empty_rows(x), empty_rows(x, torch.int32)),
    kernel=lambda x: KernelQuant(),
    input_shift=0.7,  # inputs centred off zero, so min and max are asymmetric
)
