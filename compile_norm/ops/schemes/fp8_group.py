"""FP8 e4m3, one scale per group of ``group_size`` along the last dim (DeepSeek-style blocks).

Scales ``[..., H / group_size]``, row- or column-major; UE8M0 rounds them up to a power of two.
The scale arithmetic is the dynamic FP8 schemes' arguments (``quant.FP8Scale``), as for
fp8_dynamic: the minimum, where it clamps, the scale form, the scale rounded to x's dtype, the
inverse rounded down to a power of two.
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, FP8Scale, KernelQuant, QuantScheme, check_fp8_scale_args,
                     empty_q, f32, fp8_apply_scale, fp8_dynamic_scale, fp8_kernel_scale,
                     fp8_scale_options, fp8_scale_parameters, group_scales_empty)


@fp8_scale_parameters
def reference(
    x: torch.Tensor,
    group_size: int = 128,
    column_major_scales: bool = False,
    use_ue8m0: bool = False,
    *,
    how: FP8Scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    groups = y.reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    amax = groups.abs().amax(-1)
    scale = fp8_dynamic_scale(amax, x.dtype, how)
    if use_ue8m0:
        pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
        # log2 rounds to an integer just above a power of two (2^k * (1 + 2^-23) -> k):
        # double that case so the scale is never rounded down (q would saturate).
        scale = torch.where(pow2 < scale, pow2 * 2.0, pow2)
    q = fp8_apply_scale(groups, scale.unsqueeze(-1), how.scale_form).reshape(y.shape)
    if column_major_scales:  # same strides as group_scales_empty(..., column_major=True)
        nd = scale.dim()
        scale = scale.permute(nd - 1, *range(nd - 1)).contiguous().permute(*range(1, nd), 0)
    return q, scale


@fp8_scale_parameters
def check(op, x, group_size, column_major_scales, use_ue8m0, *, how):
    checks.check_group_size(op, x, group_size)
    check_fp8_scale_args(op, how)
    if use_ue8m0 and how.scale_form == "inverse":
        raise ValueError(f"compile_norm.{op}: use_ue8m0 rounds the scale amax / 448, "
                         f"not scale_form='inverse'")


@fp8_scale_parameters
def kernel(x, group_size, column_major_scales, use_ue8m0, *, how):
    # the kernel's tiles are powers of two, so its groups must be too
    if not (isinstance(group_size, int) and 0 < group_size and group_size & (group_size - 1) == 0
            and x.shape[-1] % group_size == 0):
        return None
    return KernelQuant(group=group_size, column_major=bool(column_major_scales),
                       ue8m0=bool(use_ue8m0),
                       **fp8_kernel_scale(how))


SCHEME = QuantScheme(
    name="fp8_group",
    reference=reference,
    outputs=("q", "scales"),
    fake=lambda x, group_size=128, column_major_scales=False, *args: (
        empty_q(x, FP8_DTYPE), group_scales_empty(x, group_size, column_major_scales)),
    check=check,
    kernel=kernel,
    options={"group_size": 128, "column_major": False, "ue8m0": False,
             **FP8Scale()._asdict()},
    example_args=lambda options, device: dict(
        group_size=options["group_size"], column_major_scales=options["column_major"],
        use_ue8m0=options["ue8m0"], **fp8_scale_options(options)),
    variants=(
        {"group_size": 64},
        {"column_major": True},
        {"column_major": True, "shape": lambda tokens, h: (2, 3, h)},
        {"ue8m0": True},
        {"column_major": True, "ue8m0": True, "shape": lambda tokens, h: (tokens, 128)},
        {"min_scale": None},  # DeepSeek-V3's first act_quant
        {"min_scale": 2.5, "clamp_amax": True},  # DeepSeek-V3's act_quant form, binding on some groups
        {"scale_form": "multiply", "min_scale": 0.005},
        {"scale_form": "inverse", "min_scale": 2.5, "clamp_amax": True},  # torchao's form
        {"min_scale": None, "scale_in_x_dtype": True},
        {"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True, "pow2_inverse": True},
    ),
)
