"""The checker's tolerances (compile_norm.kernels.checking): the bound is real and tight, and
planted bugs are caught. CPU only, no triton needed."""

from __future__ import annotations

import pytest
import torch

import compile_norm  # noqa: F401
from compile_norm.kernels import checking
from compile_norm.ops import registry

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _positive_values(dtype, lo, hi):
    """Every positive finite value of 16-bit ``dtype`` in [lo, hi)."""
    bits = torch.arange(1, 0x7C00 if dtype == F16 else 0x7F80, dtype=torch.int32)
    v = bits.to(torch.int16).view(dtype).float()
    return v[(v >= lo) & (v < hi)]


def _flip_distance(dtype, y, w, absolute=False):
    """Ordinal distance (or absolute difference) of round(round(y') * w) from
    round(y * w) for y' = y's neighbours."""
    y16 = y.to(dtype)
    code = y16.view(torch.int16)
    worst = 0
    for step in (-1, 1):
        yn = (code + step).view(dtype).float()  # y's neighbour in dtype (positive y only)
        p = (y16.float()[:, None] * w[None, :]).to(dtype)  # exact fp32 product, one rounding
        pn = (yn[:, None] * w[None, :]).to(dtype)
        if absolute:
            worst = max(worst, float((p.double() - pn.double()).abs().max()))
        else:
            d = (checking._ordinal16(p, dtype) - checking._ordinal16(pn, dtype)).abs()
            worst = max(worst, int(d.max()))
    return worst


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_two_roundings_move_the_output_by_at_most_two_ulps(dtype):
    # One flip of the first rounding (round(y) off by one ulp) moves round(round(y) * w) by
    # at most 2 ulps, and 2 is reached: the checker's K=2 for 16-bit weights is exact.
    m = 7 if dtype == BF16 else 10
    # every mantissa pair in one binade of y and two of w (the bound is scale invariant) ...
    y = _positive_values(dtype, 1.0, 2.0)
    w = _positive_values(dtype, 0.5, 2.0)
    if dtype == F16:
        w = w[::4]
    assert _flip_distance(dtype, y, w) == 2
    # ... and normal y across many binades (incl. binade boundaries), w in [0.25, 4)
    tiny_normal = 2.0 ** -14 if dtype == F16 else 2.0 ** -126
    y = _positive_values(dtype, max(tiny_normal, 2.0 ** -30), 2.0 ** 8)
    w = _positive_values(dtype, 0.25, 4.0)[:: 2 ** (m - 4)]
    assert _flip_distance(dtype, y, w) <= 2
    if dtype == F16:  # subnormal y: the absolute floor covers it (|w| < 7)
        y = _positive_values(dtype, 0.0, tiny_normal)
        w = _positive_values(dtype, 0.25, 7.0)[::16]
        floor = checking.SUBNORMAL_ULPS * 2.0 ** -24
        assert floor / 2 < _flip_distance(dtype, y, w, absolute=True) <= floor


def test_one_rounding_paths_get_one_ulp():
    assert checking.out_tolerance(BF16, BF16, 0.0) == (BF16, 2)
    assert checking.out_tolerance(BF16, BF16, 1.0) == (BF16, 1)  # Gemma: fp32 w + 1
    assert checking.out_tolerance(BF16, None) == (BF16, 1)
    assert checking.out_tolerance(BF16, F32) == (BF16, 1)
    assert checking.out_tolerance(F16, BF16) == (BF16, 2)  # coarser dtype counts
    assert checking.out_tolerance(F32, BF16) == (BF16, 2)  # fp32 out holds bf16 values
    assert checking.out_tolerance(F32, F32) == (None, 0)
    assert checking.out_tolerance(F32, None) == (None, 0)


def test_ulps_are_counted_across_binade_boundaries_and_subnormals():
    def ok(got, ref, dtype, w="same"):
        pad = [1.0] * 200  # equal elements: keep the mismatch fraction under 1%
        g, r = torch.tensor(got + pad, dtype=dtype), torch.tensor(ref + pad, dtype=dtype)
        return checking.compare("rms_norm", g, r, dtype, w_dtype=w).ok

    # below 2.0 the bf16 step is 2**-7, above it 2**-6: 1.984375 is 2 ulps below 2.0
    assert ok([1.9921875], [2.0], BF16, None)
    assert not ok([1.984375], [2.0], BF16, None)  # |ref| * 2**-7 would have accepted it
    assert ok([2.015625], [2.0], BF16, None)
    assert not ok([2.03125], [2.0], BF16, None)
    assert ok([2.03125], [2.0], BF16)  # two roundings (bf16 weight): 2 ulps
    assert not ok([2.046875], [2.0], BF16)
    # fp16 subnormals: one ulp is 2**-24 whatever |ref| is; across zero counts too
    tiny = 2.0 ** -24
    assert ok([2 * tiny], [tiny], F16, None)
    assert ok([-0.0], [tiny], F16, None)
    assert not ok([-tiny], [tiny], F16, None) and ok([-tiny], [tiny], F16)  # 2 apart
    assert not ok([-2 * tiny], [tiny], F16, None)
    # inf must match inf
    assert not ok([float("inf")], [65504.0], F16)


def _norm_call(op, shape, dtype, seed=0):
    case = checking.Case(op, shape, dtype)
    args, kwargs = checking.build_call(case, "cpu", seed)
    return checking.positional(op, args, kwargs)


def _one_rounding_rms_norm(x, weight, eps, weight_offset=0.0, variance_size=None):
    """Planted bug: the weight applied in fp32 with one rounding (Inductor's usual fusion)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _rstd_off_rms_norm(x, weight, eps, weight_offset=0.0, variance_size=None):
    """Planted bug: mean over H - 1 columns (rstd off by ~1/(2H))."""
    xf = x.float()
    var = xf.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)
    y = xf * torch.rsqrt(var + eps)
    return (y.to(weight.dtype) * weight).to(x.dtype)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("bug", [_one_rounding_rms_norm, _rstd_off_rms_norm])
def test_planted_norm_bugs_are_caught(dtype, bug):
    pos = _norm_call("rms_norm", (64, 2304), dtype)
    ref = registry.ops()["rms_norm"].reference(*pos)
    res = checking.compare("rms_norm", bug(*pos), ref, dtype)
    assert not res.ok, res


def test_rstd_noise_passes():
    # rstd off by one fp32 ulp (what another reduction order gives): within tolerance
    pos = _norm_call("rms_norm", (64, 2304), BF16)
    x, w, eps = pos[:3]
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    rstd = torch.nextafter(rstd, torch.full_like(rstd, 2.0))
    got = ((xf * rstd).to(BF16) * w).to(BF16)
    ref = registry.ops()["rms_norm"].reference(*pos)
    res = checking.compare("rms_norm", got, ref, BF16)
    assert res.ok, res


def test_planted_quant_bugs_are_caught():
    pos = _norm_call("rms_norm_int8_dynamic", (16, 512), BF16)
    q, scale = registry.ops()["rms_norm_int8_dynamic"].reference(*pos)
    op = "rms_norm_int8_dynamic"
    assert checking.compare(op, (q.clone(), scale.clone()), (q, scale), BF16).ok
    # off by 2 where |q| is small: beyond 1 + ceil(2 * 2**-6 * |t|) = 2? |t| <= 31 -> bound 2
    small = (q.int().abs() <= 20).nonzero()[0]
    bad = q.clone()
    bad[tuple(small)] = (bad[tuple(small)].int() + 3).clamp(-128, 127).to(torch.int8)
    assert not checking.compare(op, (bad, scale), (q, scale), BF16).ok
    # a scale off by 2**-5 (beyond 2 bf16 ulps)
    assert not checking.compare(op, (q, scale * (1 + 2.0 ** -5)), (q, scale), BF16).ok
    # fp8: one code two steps off
    op = "rms_norm_fp8_dynamic"
    pos = _norm_call(op, (16, 512), BF16)
    q8, s8 = registry.ops()[op].reference(*pos)
    bad8 = q8.clone().view(torch.uint8)
    bad8[0, 0] = bad8[0, 0] + 2 if (bad8[0, 0] & 0x7F) < 0x70 else bad8[0, 0] - 2
    assert not checking.compare(op, (bad8.view(q8.dtype), s8), (q8, s8), BF16).ok
    bad8[0, 0] = q8.view(torch.uint8)[0, 0] + (1 if (bad8[0, 0] & 0x7F) < 0x70 else -1)
    assert checking.compare(op, (bad8.view(q8.dtype), s8), (q8, s8), BF16).ok
