"""MXFP8 (OCP Microscaling v1.0): blocks of ``block_size`` (32) along the last dim, each with
one E8M0 scale (a power of two, stored as its biased exponent), elements float8_e4m3fn.

The scale of a block follows torchao's ``to_mx`` (torchao/prototype/mx_formats/mx_tensor.py)
for ``scaling_mode`` (its ``ScaleCalculationMode`` values), bit for bit:

- ``floor`` (torchao's default, the OCP spec's): ``2^(floor(log2 amax) - 8)`` from amax's
  exponent bits (8: the largest power of two of e4m3, 256); ``ceil``: + 1 when amax is not a
  power of two; ``even``: amax's mantissa rounded to 3 bits first. The biased exponent is
  clamped to [0, 255], NaN amax gives 255; the elements are ``x / max(2^(code - 127), 2^-126)``.
- ``rceil`` (NVIDIA's cuBLAS recipe): ``code = ceil(log2(amax / 448)) + 127`` clamped to
  [0, 254] (NaN 255, inf 254), the elements ``x * 2^(127 - code)`` (code 0: ``x * 1``, code
  255: NaN).

``q = clamp(v, -448, 448).to(float8_e4m3fn)`` (torchao clamps eagerly; a compiled cast
saturates the same way). Outputs: ``q`` (x's shape) and ``scales`` ``[..., H / block_size]``
as ``float8_e8m0fnu``, row-major, torchao's unswizzled layout.
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import FP8_DTYPE, FP8_MAX, KernelQuant, QuantScheme, empty_q, f32, saturate_fp8

E8M0_DTYPE = torch.float8_e8m0fnu
E8M0_BIAS = 127
E8M0_NAN = 255
E4M3_MAX_POW2 = 8  # the largest power of two of float8_e4m3fn: 2^8 = 256
F32_MIN_NORMAL = 2.0 ** -126
# The kernel's MX_SCALE constexpr for each scaling mode.
SCALING_MODES = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}


def _biased_exponent(amax: torch.Tensor, scaling_mode: str) -> torch.Tensor:
    """floor / ceil / even: the E8M0 code from amax's float32 bits (as int32)."""
    bits = amax.view(torch.int32)
    if scaling_mode == "even":  # round the mantissa to e4m3's 3 bits (carry into the exponent)
        bits = (bits + (1 << (23 - 3 - 1))) & -(1 << 23)
    pow2 = ((bits >> 23) & 0xFF) - E8M0_BIAS
    if scaling_mode == "ceil":
        pow2 = pow2 + ((bits & 0x7FFFFF) > 0).to(torch.int32)
    unbiased = torch.clamp(pow2 - E4M3_MAX_POW2, min=-E8M0_BIAS, max=E8M0_BIAS + 1)
    code = (unbiased + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isnan(amax), E8M0_NAN, code)


def reference(
    x: torch.Tensor, block_size: int = 32, scaling_mode: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor]:
    y = f32(x)
    blocks = y.reshape(*y.shape[:-1], y.shape[-1] // block_size, block_size)
    amax = blocks.abs().amax(-1, keepdim=True)
    if scaling_mode == "rceil":
        descale = amax / FP8_MAX
        finite = torch.clamp(torch.ceil(torch.log2(descale)), min=-E8M0_BIAS, max=E8M0_BIAS)
        code = torch.where(torch.isnan(descale), E8M0_NAN,
                           torch.where(torch.isinf(descale), 254, (finite + E8M0_BIAS).to(torch.uint8)))
        rcp = torch.where(code == E8M0_NAN, descale, torch.where(
            code == 254, 2.0 ** -127,
            torch.where(code == 0, 1.0, torch.exp2(E8M0_BIAS - code.to(torch.float32)))))
        v = blocks * rcp
    else:
        code = _biased_exponent(amax, scaling_mode)
        scale = torch.clamp((code.to(torch.int32) << 23).view(torch.float32), min=F32_MIN_NORMAL)
        v = blocks / scale
    q = saturate_fp8(v).reshape(y.shape)
    return q, code.squeeze(-1).view(E8M0_DTYPE)


def check(op, x, block_size=32, scaling_mode="floor"):
    checks.check_group_size(op, x, block_size, "block_size")
    if scaling_mode not in SCALING_MODES:
        checks.fail(op, f"scaling_mode must be one of {sorted(SCALING_MODES)}, got {scaling_mode!r}")


def fake(x, block_size=32, scaling_mode="floor"):
    scales = x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=E8M0_DTYPE)
    return empty_q(x, FP8_DTYPE), scales


def kernel(x, block_size=32, scaling_mode="floor"):
    # the kernel's tiles are powers of two, so its blocks must be too
    if not (isinstance(block_size, int) and 0 < block_size and block_size & (block_size - 1) == 0
            and x.shape[-1] % block_size == 0 and scaling_mode in SCALING_MODES):
        return None
    return KernelQuant(group=block_size, mx_scale=SCALING_MODES[scaling_mode])


SCHEME = QuantScheme(
    name="mxfp8",
    reference=reference,
    outputs=("q", "scales"),
    fake=fake,
    check=check,
    kernel=kernel,
    options={"block_size": 32, "scaling_mode": "floor"},
    example_args=lambda options, device: dict(
        block_size=options["block_size"], scaling_mode=options["scaling_mode"]),
    variants=(
        {"scaling_mode": "ceil"},
        {"scaling_mode": "even"},
        {"scaling_mode": "rceil"},
        {"block_size": 64},
        {"scaling_mode": "rceil", "shape": lambda tokens, h: (2, 3, h)},
    ),
)
