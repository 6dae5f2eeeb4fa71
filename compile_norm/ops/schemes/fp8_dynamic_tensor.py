"""FP8 e4m3, one dynamic scale for the whole tensor (torchao's tensorwise recipe):
``scale = max(amax(|x|) / 448, 1 / (448 * 512))`` over every element, ``q = sat(x / scale)``.

The whole-tensor amax is a reduction across every program, so the row kernel has no mode for
it (``kernel`` is None): kernels/two_pass.py runs it as two launches of the row kernel (per-row
scales, then the static quantization with their max), the eager "triton" provider. Compiled
graphs take Inductor's generated code for the reference unless a measured choice says otherwise.
"""

from __future__ import annotations

import torch

from ..quant import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, QuantScheme, empty_q, f32, saturate_fp8


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax() if y.numel() else y.new_zeros(())  # no tokens: the minimum scale
    scale = torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE)
    return saturate_fp8(y / scale), scale


SCHEME = QuantScheme(
    name="fp8_dynamic_tensor",
    reference=reference,
    outputs=("q", "scale"),
    fake=lambda x: (empty_q(x, FP8_DTYPE), torch.empty((), dtype=torch.float32, device=x.device)),
)
