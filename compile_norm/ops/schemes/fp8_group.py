"""FP8 e4m3, one scale per group of ``group_size`` along the last dim (DeepSeek-style blocks).

Scales ``[..., H / group_size]``, row- or column-major; UE8M0 rounds them up to a power of two.
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, KernelQuant, QuantScheme, empty_q, f32,
                     group_scales_empty, saturate_fp8)


def reference(
    x: torch.Tensor,
    group_size: int = 128,
    column_major_scales: bool = False,
    use_ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    groups = y.reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    amax = groups.abs().amax(-1)
    scale = torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE)
    if use_ue8m0:
        pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
        # log2 rounds to an integer just above a power of two (2^k * (1 + 2^-23) -> k):
        # double that case so the scale is never rounded down (q would saturate).
        scale = torch.where(pow2 < scale, pow2 * 2.0, pow2)
    q = saturate_fp8(groups / scale.unsqueeze(-1)).reshape(y.shape)
    if column_major_scales:  # same strides as group_scales_empty(..., column_major=True)
        nd = scale.dim()
        scale = scale.permute(nd - 1, *range(nd - 1)).contiguous().permute(*range(1, nd), 0)
    return q, scale


def check(op, x, group_size=128, column_major_scales=False, use_ue8m0=False):
    checks.check_group_size(op, x, group_size)


def kernel(x, group_size=128, column_major_scales=False, use_ue8m0=False):
    # the kernel's tiles are powers of two, so its groups must be too
    if not (isinstance(group_size, int) and 0 < group_size and group_size & (group_size - 1) == 0
            and x.shape[-1] % group_size == 0):
        return None
    return KernelQuant(group=group_size, column_major=bool(column_major_scales),
                       ue8m0=bool(use_ue8m0))


SCHEME = QuantScheme(
    name="fp8_group",
    reference=reference,
    outputs=("q", "scales"),
    fake=lambda x, group_size=128, column_major_scales=False, use_ue8m0=False: (
        empty_q(x, FP8_DTYPE), group_scales_empty(x, group_size, column_major_scales)),
    check=check,
    kernel=kernel,
    options={"group_size": 128, "column_major": False, "ue8m0": False},
    example_args=lambda options, device: dict(
        group_size=options["group_size"], column_major_scales=options["column_major"],
        use_ue8m0=options["ue8m0"]),
    variants=(
        {"group_size": 64},
        {"column_major": True},
        {"column_major": True, "shape": lambda tokens, h: (2, 3, h)},
        {"ue8m0": True},
        {"column_major": True, "ue8m0": True, "shape": lambda tokens, h: (tokens, 128)},
    ),
)
