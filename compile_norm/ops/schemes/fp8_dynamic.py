"""FP8 e4m3, dynamic per-token scale: by default
``scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))``, ``q = sat(x / scale)``.

How the scale is computed is an argument, so that each library's spelling is this op bit for
bit (``quant.fp8_dynamic_scale``): ``min_scale`` (None: no minimum), ``clamp_amax`` (the
minimum clamps amax before the division instead of the scale after it), ``scale_form``
("divide", "multiply": ``x * reciprocal(scale)``, "inverse": ``448 / amax`` returned and
multiplied), ``scale_in_x_dtype`` (``amax / 448`` rounded to x's dtype), ``pow2_inverse``
(the inverse scale rounded down to a power of two as ``exp2(floor(log2(r)))``: torchao's
rowwise recipe, ``round_scales_to_power_of_2``).
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, FP8_MIN_SCALE, KernelQuant, QuantScheme, check_fp8_scale_args,
                     empty_q, empty_rows, f32, fp8_apply_scale, fp8_dynamic_scale,
                     fp8_kernel_scale)


def reference(
    x: torch.Tensor,
    scale_ub: torch.Tensor | None = None,
    min_scale: float | None = FP8_MIN_SCALE,
    clamp_amax: bool = False,
    scale_form: str = "divide",
    scale_in_x_dtype: bool = False,
    pow2_inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    amax = y.abs().amax(-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.reshape(()))
    scale = fp8_dynamic_scale(amax, x.dtype, min_scale, clamp_amax, scale_form, scale_in_x_dtype)
    if pow2_inverse:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return fp8_apply_scale(y, scale, scale_form), scale


def check(op, x, scale_ub=None, min_scale=FP8_MIN_SCALE, clamp_amax=False, scale_form="divide",
          scale_in_x_dtype=False, pow2_inverse=False):
    if scale_ub is not None:
        checks.check_scale(op, "scale_ub", scale_ub, x)
    check_fp8_scale_args(op, min_scale, clamp_amax, scale_form, scale_in_x_dtype)
    if pow2_inverse and scale_form != "inverse":
        raise ValueError(f"compile_norm.{op}: pow2_inverse rounds the inverse scale: it needs "
                         f"scale_form='inverse', got {scale_form!r}")


def kernel(x, scale_ub=None, min_scale=FP8_MIN_SCALE, clamp_amax=False, scale_form="divide",
           scale_in_x_dtype=False, pow2_inverse=False):
    fields = fp8_kernel_scale(min_scale, clamp_amax, scale_form, scale_in_x_dtype)
    if pow2_inverse:
        fields["scale_form"] = 3  # the kernel's "inverse, rounded down to a power of two"
    return KernelQuant(aux=scale_ub, **fields)


SCHEME = QuantScheme(
    name="fp8_dynamic",
    reference=reference,
    outputs=("q", "scale"),
    fake=lambda x, *args: (empty_q(x, FP8_DTYPE), empty_rows(x)),
    check=check,
    kernel=kernel,
    options={"scale_ub": False, "min_scale": FP8_MIN_SCALE, "clamp_amax": False,
             "scale_form": "divide", "scale_in_x_dtype": False, "pow2_inverse": False},
    example_args=lambda options, device: dict(
        scale_ub=torch.tensor(3.0, dtype=torch.float32, device=device)
        if options["scale_ub"] else None,
        min_scale=options["min_scale"], clamp_amax=options["clamp_amax"],
        scale_form=options["scale_form"], scale_in_x_dtype=options["scale_in_x_dtype"],
        pow2_inverse=options["pow2_inverse"]),
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
