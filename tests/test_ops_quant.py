"""quant_<scheme> ops against the quantization formulas, written here independently in numpy
(float32 arithmetic; torch only for the final cast to float8, which is the rounding itself)."""

import math

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_bitwise_equal, cn, randn

FP8 = torch.float8_e4m3fn
FP8_MAX = np.float32(448.0)
FP8_MIN_SCALE = np.float32(1.0 / (448.0 * 512.0))
INT8_MIN_SCALE = np.float32(1e-10)
F32 = np.float32


def _np(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy()


def _fp8(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(FP8)


def _int8(v: np.ndarray) -> torch.Tensor:
    v = np.where(np.isnan(v), F32(0), v)  # the reference maps NaN to 0 (INT8 has no NaN)
    return torch.from_numpy(np.clip(v, -128, 127).astype(np.int8))


def _t(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


# --- the formulas ----------------------------------------------------------------------
# numpy warns on inf/inf and 0*inf; the formulas want IEEE results, silently.


@np.errstate(all="ignore")
def fp8_static(x, scale):
    return _fp8(np.clip(_np(x) / F32(scale.item()), -FP8_MAX, FP8_MAX))


@np.errstate(all="ignore")
def fp8_dynamic(x, scale_ub=None):
    y = _np(x)
    amax = np.abs(y).max(-1, keepdims=True)
    if scale_ub is not None:
        amax = np.minimum(amax, F32(scale_ub.item()))
    scale = np.maximum(amax / FP8_MAX, FP8_MIN_SCALE)
    return _fp8(np.clip(y / scale, -FP8_MAX, FP8_MAX)), _t(scale)


def pow2_ceil(s: np.ndarray) -> np.ndarray:
    """Smallest power of two >= s, exactly (frexp: s = m * 2**e with m in [0.5, 1))."""
    m, e = np.frexp(s)
    up = np.where(m == 0.5, s, np.ldexp(F32(1.0), e).astype(np.float32))
    return np.where(np.isfinite(s), up, s)


@np.errstate(all="ignore")
def fp8_group(x, group_size, use_ue8m0=False):
    y = _np(x)
    g = y.reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    scale = np.maximum(np.abs(g).max(-1) / FP8_MAX, FP8_MIN_SCALE)
    if use_ue8m0:
        scale = pow2_ceil(scale)
    q = np.clip(g / scale[..., None], -FP8_MAX, FP8_MAX).reshape(y.shape)
    return _fp8(q), _t(scale)


@np.errstate(all="ignore")
def int8_static(x, scale, azp=None):
    v = np.rint(_np(x) / F32(scale.item()))  # rint: round half to even
    if azp is not None:
        v = v + F32(azp.item())
    return _int8(v)


@np.errstate(all="ignore")
def int8_dynamic(x):
    y = _np(x)
    scale = np.maximum(np.abs(y).max(-1, keepdims=True) / F32(127), INT8_MIN_SCALE)
    return _int8(np.rint(y / scale)), _t(scale)


@np.errstate(all="ignore")
def int8_dynamic_asym(x):
    y = _np(x)
    lo, hi = y.min(-1, keepdims=True), y.max(-1, keepdims=True)
    scale = np.maximum((hi - lo) / F32(255), INT8_MIN_SCALE)
    azp = np.rint(F32(-128) - lo / scale)
    azp = np.where(np.isnan(azp), F32(0), azp)
    q = _int8(np.rint(y / scale) + azp)
    return q, _t(scale), torch.from_numpy(azp.astype(np.int32))


def dequant_fp8(q, scale):
    return q.float() * scale


# --- FP8 -------------------------------------------------------------------------------

SHAPES = [(4, 96), (2, 3, 256), (3, 3000)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_static(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=2.0)
    scale = torch.tensor(0.01)
    q = cn.quant_fp8_static(x, scale)
    assert q.dtype == FP8 and q.shape == x.shape
    assert_bitwise_equal(q, fp8_static(x, scale))
    # Dequantization: e4m3 keeps 3 mantissa bits (relative error <= 2^-4), subnormal
    # spacing 2^-9 (absolute error <= 2^-10 * scale); saturated values excepted.
    y = x.float()
    inside = (y / scale).abs() <= 448
    err = (dequant_fp8(q, scale) - y).abs()
    assert bool((err <= y.abs() * 2**-4 + scale * 2**-10)[inside].all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_static_scale_forms(dtype):
    # "multiply": y * reciprocal(s) (the two-pass path of a per-tensor "multiply" scale),
    # "inverse": y * r; neither is y / s bit for bit in general
    x = randn(5, 300, dtype=dtype, scale=2.0)
    s = torch.tensor(0.0123)
    y = x.float()
    assert_bitwise_equal(cn.quant_fp8_static(x, s, scale_form="multiply"),
                         (y * torch.reciprocal(s)).clamp(-448, 448).to(FP8))
    assert_bitwise_equal(cn.quant_fp8_static(x, s, scale_form="inverse"),
                         (y * s).clamp(-448, 448).to(FP8))


def test_fp8_static_saturates_large_values():
    x = torch.tensor([[1000.0, -1000.0, 448.0, 449.0, -460.0, 3e38, 0.5]])
    q = cn.quant_fp8_static(x, torch.tensor(1.0)).float()
    assert q.tolist() == [[448.0, -448.0, 448.0, 448.0, -448.0, 448.0, 0.5]]
    # (Whether a plain float32 -> e4m3fn cast saturates or gives NaN depends on the torch
    # version; the op saturates either way.)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ub", [False, True])
def test_fp8_dynamic(shape, dtype, with_ub):
    x = randn(*shape, scale=3.0)
    x[..., 0, :] *= 0.1  # some rows stay below the upper bound
    x = x.to(dtype)
    ub = torch.tensor(2.5) if with_ub else None
    q, scale = cn.quant_fp8_dynamic(x, ub)
    assert q.dtype == FP8 and scale.dtype == torch.float32
    assert scale.shape == (*shape[:-1], 1)
    assert_bitwise_equal((q, scale), fp8_dynamic(x, ub))
    y = x.float()
    amax = y.abs().amax(-1, keepdim=True)
    qmax = q.float().abs().amax(-1, keepdim=True)
    assert bool((qmax == 448).all())  # each row uses the full range
    if with_ub:
        clamped = amax > ub
        assert bool(clamped.any()) and bool((~clamped).any())
        assert bool((scale[clamped.expand_as(scale)] == ub / 448).all())
        # Values above the upper bound saturate.
        assert bool((q.float().abs()[(y.abs() >= ub).expand_as(y)] == 448).all())
    inside = y.abs() <= torch.minimum(amax, ub) if with_ub else torch.ones_like(y, dtype=bool)
    err = (dequant_fp8(q, scale) - y).abs()
    assert bool((err <= y.abs() * 2**-4 + scale * 2**-10)[inside].all())


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_group(group_size, column_major, use_ue8m0, dtype):
    x = randn(2, 5, 768, dtype=dtype, scale=2.0)
    q, scales = cn.quant_fp8_group(
        x, group_size=group_size, column_major_scales=column_major, use_ue8m0=use_ue8m0
    )
    eq, escales = fp8_group(x, group_size, use_ue8m0)
    assert_bitwise_equal(q, eq)
    assert_bitwise_equal(scales.contiguous(), escales)
    groups = 768 // group_size
    assert scales.shape == (2, 5, groups)
    if column_major:  # token index fastest: scales[..., g] is contiguous over tokens
        assert scales.stride() == (5, 1, 10)
        assert scales.permute(2, 0, 1).is_contiguous()
    else:
        assert scales.stride() == (5 * groups, groups, 1)
    unrounded = x.float().reshape(2, 5, groups, group_size).abs().amax(-1) / 448
    if use_ue8m0:
        mantissa, _ = torch.frexp(scales)
        assert bool((mantissa == 0.5).all())  # exact powers of two
        assert bool((scales >= unrounded).all()) and bool((scales < 2 * unrounded).all())
    else:
        torch.testing.assert_close(scales, unrounded, rtol=1e-6, atol=0)
    y = x.float().reshape(2, 5, groups, group_size)
    deq = q.float().reshape(y.shape) * scales.unsqueeze(-1)
    assert bool(((deq - y).abs() <= y.abs() * 2**-4 + scales.unsqueeze(-1) * 2**-10).all())


def test_ue8m0_rounds_up_just_above_a_power_of_two():
    # amax / 448 = 2^-5 * (1 + 2^-23): float32 log2 gives exactly -5, so a plain
    # exp2(ceil(log2(s))) would round the scale *down* to 2^-5.
    x = torch.zeros(1, 64)
    x[0, 3] = 14.0 + 2.0**-20
    x[0, 10] = -1.0
    q, scales = cn.quant_fp8_group(x, group_size=64, use_ue8m0=True)
    assert scales.item() == 2.0**-4
    assert q.float()[0, 3].item() == 224.0  # no saturation
    assert_bitwise_equal(q, fp8_group(x, 64, True)[0])


# --- INT8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("azp", [None, 0, 3, -7])
def test_int8_static_round_half_even(dtype, azp):
    scale = torch.tensor(0.25)  # a power of two: x / scale is exact
    halves = torch.arange(-12, 12, dtype=torch.float32) + 0.5  # -11.5 ... 11.5
    x = (halves * 0.25).to(dtype).reshape(2, 24 // 2)
    azp_t = None if azp is None else torch.tensor(azp, dtype=torch.int32)
    q = cn.quant_int8_static(x, scale, azp_t)
    assert q.dtype == torch.int8
    # Python's round() is round-half-to-even, written independently of torch and numpy.
    expected = [[round(v) + (azp or 0) for v in row] for row in halves.reshape(2, 12).tolist()]
    assert q.tolist() == expected
    assert q.tolist() != [[math.floor(v + 0.5) + (azp or 0) for v in r] for r in halves.reshape(2, 12).tolist()]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("azp", [None, 9])
def test_int8_static(shape, dtype, azp):
    x = randn(*shape, dtype=dtype, scale=2.0)
    scale = torch.tensor(0.03)  # ~5% of values clamp at -128 / 127
    azp_t = None if azp is None else torch.tensor(azp, dtype=torch.int32)
    q = cn.quant_int8_static(x, scale, azp_t)
    assert_bitwise_equal(q, int8_static(x, scale, azp_t))
    assert int(q.max()) == 127 and int(q.min()) == -128  # clamped at both ends
    y, zp = x.float(), azp or 0
    inside = (y / scale + zp > -128) & (y / scale + zp < 127)
    err = ((q.float() - zp) * scale - y).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5))[inside].all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_dynamic(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    q, scale = cn.quant_int8_dynamic(x)
    assert q.dtype == torch.int8 and scale.shape == (*shape[:-1], 1)
    assert_bitwise_equal((q, scale), int8_dynamic(x))
    assert bool((q.abs().amax(-1) == 127).all())
    assert int(q.min()) >= -127  # symmetric
    err = (q.float() * scale - x.float()).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift", [0.0, 2.5])
def test_int8_dynamic_asym(shape, dtype, shift):
    x = (randn(*shape, scale=3.0) + shift).to(dtype)  # also rows that are mostly positive
    q, scale, azp = cn.quant_int8_dynamic_asym(x)
    assert q.dtype == torch.int8 and azp.dtype == torch.int32
    assert scale.shape == azp.shape == (*shape[:-1], 1)
    assert_bitwise_equal((q, scale, azp), int8_dynamic_asym(x))
    assert bool((q.amin(-1) == -128).all()) and bool((q.amax(-1) >= 126).all())
    err = ((q.float() - azp.float()) * scale - x.float()).abs()
    assert bool((err <= scale / 2 * (1 + 1e-4)).all())


# --- zero rows, NaN, inf, zero tokens --------------------------------------------------

ALL_QUANT = [
    ("fp8_static", lambda x: cn.quant_fp8_static(x, torch.tensor(0.05)), lambda x: fp8_static(x, torch.tensor(0.05))),
    ("fp8_dynamic", lambda x: cn.quant_fp8_dynamic(x), fp8_dynamic),
    ("fp8_dynamic_ub", lambda x: cn.quant_fp8_dynamic(x, torch.tensor(1.0)), lambda x: fp8_dynamic(x, torch.tensor(1.0))),
    ("fp8_group", lambda x: cn.quant_fp8_group(x, group_size=64), lambda x: fp8_group(x, 64)),
    ("fp8_group_ue8m0", lambda x: cn.quant_fp8_group(x, group_size=64, use_ue8m0=True), lambda x: fp8_group(x, 64, True)),
    ("int8_static", lambda x: cn.quant_int8_static(x, torch.tensor(0.05), torch.tensor(4, dtype=torch.int32)), lambda x: int8_static(x, torch.tensor(0.05), torch.tensor(4))),
    ("int8_dynamic", lambda x: cn.quant_int8_dynamic(x), int8_dynamic),
    ("int8_dynamic_asym", lambda x: cn.quant_int8_dynamic_asym(x), int8_dynamic_asym),
]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _dequant(name, outs):
    q = outs[0].float()
    if name == "fp8_static":
        return q * 0.05
    if name == "int8_static":
        return (q - 4) * 0.05
    if name.startswith("fp8_group"):
        return (q.reshape(*q.shape[:-1], -1, 64) * outs[1].unsqueeze(-1)).reshape(q.shape)
    if name == "int8_dynamic_asym":
        return (q - outs[2].float()) * outs[1]
    return q * outs[1]


@pytest.mark.parametrize("name,op,formula", ALL_QUANT, ids=[c[0] for c in ALL_QUANT])
def test_all_zero_rows(name, op, formula):
    x = randn(4, 128, dtype=torch.bfloat16)
    x[1] = 0
    x[3] = 0
    outs = _as_tuple(op(x))
    assert_bitwise_equal(outs, _as_tuple(formula(x)))
    for scale in (t for t in outs[1:] if t.dtype == torch.float32):
        assert bool(scale.isfinite().all()) and bool((scale > 0).all())
    deq = _dequant(name, outs)
    assert bool((deq[1] == 0).all()) and bool((deq[3] == 0).all())
    assert bool((deq[0] != 0).any())


@pytest.mark.parametrize("name,op,formula", ALL_QUANT, ids=[c[0] for c in ALL_QUANT])
def test_nan_propagates_within_its_row(name, op, formula):
    x = randn(3, 128, scale=2.0)
    x[1, 70] = float("nan")
    outs = _as_tuple(op(x))
    assert_bitwise_equal(outs, _as_tuple(formula(x)), nan_equal=True)
    q = outs[0].float()
    # Rows without NaN are untouched: as if quantized on their own.
    for row in (0, 2):
        alone = _as_tuple(op(x[row : row + 1].clone()))
        assert_bitwise_equal(tuple(t[row] for t in outs), tuple(t[0] for t in alone))
        assert bool(q[row].isfinite().all())
    if name == "fp8_static":
        assert torch.isnan(q[1, 70]) and int(q[1].isnan().sum()) == 1
    elif name.startswith("fp8_group"):  # only the NaN's group (64..127)
        assert bool(q[1, 64:].isnan().all()) and bool(q[1, :64].isfinite().all())
        assert torch.isnan(outs[1][1, 1]) and torch.isfinite(outs[1][1, 0])
    elif name.startswith("fp8_dynamic"):
        assert bool(q[1].isnan().all()) and torch.isnan(outs[1][1, 0])
    elif name == "int8_static":
        assert q[1, 70] == 0  # NaN -> 0 (after the zero point is added), as documented
    else:  # dynamic int8: the row's scale is NaN and every q of it maps to 0
        assert torch.isnan(outs[1][1, 0]) and bool((outs[0][1] == 0).all())
        if name == "int8_dynamic_asym":
            assert outs[2][1, 0] == 0


@pytest.mark.parametrize("name,op,formula", ALL_QUANT, ids=[c[0] for c in ALL_QUANT])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf(name, op, formula, sign):
    x = randn(3, 128)
    x[1, 5] = sign * float("inf")
    x[2, 100] = float("inf")
    x[2, 101] = -float("inf")
    outs = _as_tuple(op(x))
    assert_bitwise_equal(outs, _as_tuple(formula(x)), nan_equal=True)
    q = outs[0].float()
    assert bool(q[0].isfinite().all())
    if name in ("fp8_static", "fp8_dynamic_ub"):  # a bounded scale: inf saturates
        assert q[1, 5] == sign * 448
    if name == "int8_static":
        assert q[1, 5] == (127 if sign > 0 else -128)


@pytest.mark.parametrize("name,op,formula", ALL_QUANT, ids=[c[0] for c in ALL_QUANT])
def test_zero_tokens_and_non_contiguous(name, op, formula):
    for x in (randn(0, 128), randn(2, 0, 128, dtype=torch.bfloat16)):
        outs, expected = _as_tuple(op(x)), _as_tuple(formula(x))
        for o, e in zip(outs, expected):
            assert o.shape == e.shape and o.dtype == e.dtype
    x = randn(256, 6, dtype=torch.float16).t()[:, :128]  # transposed and sliced
    outs = _as_tuple(op(x))
    assert outs[0].is_contiguous()
    assert_bitwise_equal(outs, _as_tuple(op(x.contiguous())))
    assert_bitwise_equal(outs, _as_tuple(formula(x)))
