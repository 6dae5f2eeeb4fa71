"""FP8 e4m3, one dynamic scale for the whole tensor (torchao's tensorwise recipe, torchao
inference per tensor, vLLM's per-tensor dynamic quantizer): by default
``scale = max(amax(|x|) / 448, 1 / (448 * 512))`` over every element, ``q = sat(x / scale)``.

The scale arithmetic is the dynamic FP8 schemes' arguments (``quant.FP8Scale``), as for
fp8_dynamic, applied to the whole tensor's amax; no tokens: the scale of amax 0.

The whole-tensor amax is a reduction across every program, so the row kernel has no mode for
it (``kernel`` is None): kernels/two_pass.py runs it as two launches of the row kernel (per-row
scales, then the static quantization with the tensor's), the eager "triton" provider.
Compiled graphs take Inductor's generated code for the reference unless a measured choice
says otherwise.
"""

from __future__ import annotations

import torch

from ..quant import (FP8_DTYPE, FP8Scale, QuantScheme, check_fp8_scale_args, empty_q, f32,
                     fp8_apply_scale, fp8_dynamic_scale, fp8_scale_options,
                     fp8_scale_parameters)


@fp8_scale_parameters
def reference(x: torch.Tensor, *, how: FP8Scale) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax() if y.numel() else y.new_zeros(())
    scale = fp8_dynamic_scale(amax, x.dtype, how)
    return fp8_apply_scale(y, scale, how.scale_form), scale


@fp8_scale_parameters
def check(op, x, *, how):
    check_fp8_scale_args(op, how)


@fp8_scale_parameters
def fake(x, *, how):
    return empty_q(x, FP8_DTYPE), torch.empty((), dtype=torch.float32, device=x.device)


SCHEME = QuantScheme(
    name="fp8_dynamic_tensor",
    reference=reference,
    outputs=("q", "scale"),
    fake=fake,
    check=check,
    options=FP8Scale()._asdict(),
    example_args=lambda options, device: fp8_scale_options(options),
    variants=(
        {"min_scale": None, "scale_in_x_dtype": True},  # torchao inference, PerTensor()
        {"scale_form": "multiply"},  # vLLM's native per-tensor quantizer
        {"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True},  # torchao tensorwise
        {"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True, "pow2_inverse": True},
        {"scale_form": "inverse", "min_scale": None},
        {"min_scale": 20.0, "clamp_amax": True},  # a minimum of amax that binds (amax ~ 5)
        {"min_scale": 0.02},  # a minimum of the scale that binds (amax / 448 ~ 0.01)
    ),
)
