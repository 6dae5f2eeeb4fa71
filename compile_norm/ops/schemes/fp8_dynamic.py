"""FP8 e4m3, dynamic per-token scale: by default
``scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))``, ``q = sat(x / scale)``.

How the scale is computed is an argument, so that each library's spelling is this op bit for
bit: the scale arguments of every dynamic FP8 scheme (``quant.FP8Scale``: the minimum or
none, where it clamps, ``scale_form`` "divide" / "multiply" / "inverse", the scale in x's
dtype, the inverse rounded down to a power of two: torchao's rowwise recipe).
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, FP8Scale, KernelQuant, QuantScheme, check_fp8_scale_args,
                     empty_q, empty_rows, f32, fp8_apply_scale, fp8_dynamic_scale,
                     fp8_kernel_scale, fp8_scale_options, fp8_scale_parameters)


@fp8_scale_parameters
def reference(x: torch.Tensor, scale_ub: torch.Tensor | None = None, *,
              how: FP8Scale) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.reshape(()))
    scale = fp8_dynamic_scale(amax, x.dtype, how)
    return fp8_apply_scale(y, scale, how.scale_form), scale


@fp8_scale_parameters
def check(op, x, scale_ub, *, how):
    if scale_ub is not None:
        checks.check_scale(op, "scale_ub", scale_ub, x)
    check_fp8_scale_args(op, how)


@fp8_scale_parameters
def kernel(x, scale_ub, *, how):
    return KernelQuant(aux=scale_ub, **fp8_kernel_scale(how))


SCHEME = QuantScheme(
    name="fp8_dynamic",
    reference=reference,
    outputs=("q", "scale"),
    fake=lambda x, *args: (empty_q(x, FP8_DTYPE), empty_rows(x)),
    check=check,
    kernel=kernel,
    options={"scale_ub": False, **FP8Scale()._asdict()},
    example_args=lambda options, device: dict(
        scale_ub=torch.tensor(3.0, dtype=torch.float32, device=device)
        if options["scale_ub"] else None, **fp8_scale_options(options)),
    variants=(
        {"scale_ub": True},
        {"min_scale": None},  # torchao inference; DeepSeek-V3's first act_quant
        {"min_scale": 0.02},  # a minimum that binds (amax / 448 ~ 0.008)
        {"min_scale": 3.3, "clamp_amax": True},  # DeepSeek-V3's act_quant form, binding on some rows
        {"scale_form": "multiply"},  # vLLM's native quantizer
        {"scale_form": "inverse", "min_scale": 3.3, "clamp_amax": True},  # torchao training form
        {"scale_form": "inverse", "min_scale": None},
        {"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True,
         "pow2_inverse": True},  # torchao's rowwise training recipe
        {"min_scale": None, "scale_in_x_dtype": True},  # torchao inference on 16-bit x
        {"min_scale": None, "scale_in_x_dtype": True, "dtype": torch.float16},
    ),
)
