"""rms_norm and fused_add_rms_norm: bit-exact model formulas, shapes, layouts, autograd."""

import pytest
import torch
from helpers import DTYPES, assert_bitwise_equal, cn, randn

from compile_norm.ops.norm import fused_add_rms_norm_ref, rms_norm_ref

EPS = 1e-6
HIDDEN_SIZES = (5376, 2304, 96, 3000)


# The model code the ops must reproduce bit for bit, written as the models write it.
def hf_llama_rms_norm(x, weight, eps):
    input_dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    if weight is None:
        return h.to(input_dtype)
    return weight * h.to(input_dtype)


def gemma_rms_norm(x, w, eps):
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(x)


def variance_window_rms_norm(x, weight, eps, variance_size):
    """Variance over the first ``variance_size`` columns only (e.g. a sharded hidden dim)."""
    xf = x.float()
    var = xf[..., :variance_size].pow(2).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(var + eps)
    return y.to(x.dtype) if weight is None else weight * y.to(x.dtype)


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_formula_bit_exact(dtype, hidden):
    x = randn(3, hidden, dtype=dtype, scale=3.0)
    w = randn(hidden, dtype=dtype)
    out = cn.rms_norm(x, w, EPS)
    assert out.dtype == dtype
    assert_bitwise_equal(out, hf_llama_rms_norm(x, w, EPS))


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", ["x", "fp32"])
def test_gemma_formula_bit_exact(dtype, hidden, weight_dtype):
    x = randn(3, hidden, dtype=dtype, scale=3.0)
    w = randn(hidden, dtype=dtype if weight_dtype == "x" else torch.float32, scale=0.2)
    out = cn.rms_norm(x, w, EPS, weight_offset=1.0)
    assert out.dtype == dtype
    assert_bitwise_equal(out, gemma_rms_norm(x, w, EPS))
    if dtype != torch.float32:
        # The offset is applied in fp32 with one rounding: not the same as a 16-bit 1 + w.
        assert not torch.equal(out, cn.rms_norm(x, (1.0 + w).to(dtype), EPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_weight(dtype):
    x = randn(5, 2304, dtype=dtype, scale=4.0)
    out = cn.rms_norm(x, None, EPS)
    assert_bitwise_equal(out, hf_llama_rms_norm(x, None, EPS))
    assert_bitwise_equal(cn.rms_norm(x, None, 0.0), hf_llama_rms_norm(x, None, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_size", [1, 37, 64, 95])
def test_variance_size(dtype, variance_size):
    x = randn(2, 4, 96, dtype=dtype)
    w = randn(96, dtype=dtype)
    for weight in (w, None):
        out = cn.rms_norm(x, weight, EPS, variance_size=variance_size)
        assert_bitwise_equal(out, variance_window_rms_norm(x, weight, EPS, variance_size))
    # The window really changes the result (the test would catch an ignored argument).
    assert not torch.equal(out, cn.rms_norm(x, None, EPS))
    assert_bitwise_equal(cn.rms_norm(x, w, EPS, variance_size=96), cn.rms_norm(x, w, EPS))


@pytest.mark.parametrize("shape", [(96,), (7, 96), (2, 5, 96), (2, 3, 4, 96)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_leading_shape(shape, dtype):
    x = randn(*shape, dtype=dtype)
    w = randn(96, dtype=dtype)
    out = cn.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert_bitwise_equal(out, hf_llama_rms_norm(x, w, EPS))
    assert_bitwise_equal(out.reshape(-1, 96), cn.rms_norm(x.reshape(-1, 96), w, EPS))
    y, h = cn.fused_add_rms_norm(x, x.flip(-1), w, EPS, weight_offset=1.0)
    assert_bitwise_equal(h, x + x.flip(-1))
    assert_bitwise_equal(y, gemma_rms_norm(x + x.flip(-1), w, EPS))


def _non_contiguous(kind, dtype):
    if kind == "transposed":
        return randn(96, 6, dtype=dtype).t()
    if kind == "strided":
        return randn(6, 192, dtype=dtype)[:, ::2]
    if kind == "row_slice":
        return randn(6, 110, dtype=dtype)[:, 7:103]
    return randn(4, 3, 96, dtype=dtype).transpose(0, 1)  # 3-D permuted


@pytest.mark.parametrize("kind", ["transposed", "strided", "row_slice", "permuted_3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_input(kind, dtype):
    x = _non_contiguous(kind, dtype)
    assert not x.is_contiguous()
    r = _non_contiguous(kind, dtype)
    w = randn(96, dtype=dtype)
    out = cn.rms_norm(x, w, EPS)
    assert out.is_contiguous()  # the layout the fake implementation promises
    assert_bitwise_equal(out, hf_llama_rms_norm(x.contiguous(), w, EPS))
    y, h = cn.fused_add_rms_norm(x, r, w, EPS, weight_offset=1.0)
    assert y.is_contiguous() and h.is_contiguous()
    assert_bitwise_equal(h, x.contiguous() + r.contiguous())
    assert_bitwise_equal(y, gemma_rms_norm(x.contiguous() + r.contiguous(), w, EPS))


@pytest.mark.parametrize("shape", [(0, 96), (2, 0, 96), (0, 3000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_tokens(shape, dtype):
    x = randn(*shape, dtype=dtype)
    w = randn(shape[-1], dtype=dtype)
    out = cn.rms_norm(x, w, EPS, weight_offset=1.0)
    assert out.shape == shape and out.dtype == dtype
    y, h = cn.fused_add_rms_norm(x, randn(*shape, dtype=dtype), w, EPS)
    assert y.shape == h.shape == shape and y.dtype == h.dtype == dtype


@pytest.mark.parametrize("hidden", [96, 5376])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_fused_add_equals_parts(dtype, hidden, weight_offset):
    x = randn(2, 3, hidden, dtype=dtype)
    r = randn(2, 3, hidden, dtype=dtype, scale=10.0)
    w = randn(hidden, dtype=dtype)
    y, h = cn.fused_add_rms_norm(x, r, w, EPS, weight_offset=weight_offset)
    assert_bitwise_equal(h, x + r)
    assert_bitwise_equal(y, cn.rms_norm(x + r, w, EPS, weight_offset=weight_offset))
    formula = gemma_rms_norm if weight_offset else hf_llama_rms_norm
    assert_bitwise_equal(y, formula(x + r, w, EPS))
    y2, h2 = cn.fused_add_rms_norm(x, r, None, EPS, variance_size=hidden // 3)
    assert_bitwise_equal(h2, x + r)
    assert_bitwise_equal(y2, variance_window_rms_norm(x + r, None, EPS, hidden // 3))


def test_float64_computes_in_float64():
    x = randn(4, 96, dtype=torch.float64)
    w = randn(96, dtype=torch.float64)
    xf = x
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS))
    torch.testing.assert_close(cn.rms_norm(x, w, EPS), expected, rtol=1e-15, atol=1e-15)


# --- autograd --------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param({}, True, id="weight"),
    pytest.param({}, False, id="no_weight"),
    pytest.param({"weight_offset": 1.0}, True, id="offset"),
    pytest.param({"variance_size": 10}, True, id="variance_size"),
    pytest.param({"variance_size": 5}, False, id="variance_size_no_weight"),
]


def _leaf(*shape, dtype):
    return randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("kwargs,with_weight", GRAD_CASES)
def test_gradcheck_rms_norm(kwargs, with_weight):
    x = _leaf(2, 3, 16, dtype=torch.float64)
    inputs = (x, _leaf(16, dtype=torch.float64)) if with_weight else (x,)

    def f(x, w=None):
        return cn.rms_norm(x, w, 1e-5, **kwargs)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("kwargs,with_weight", GRAD_CASES)
def test_gradcheck_fused_add_rms_norm(kwargs, with_weight):
    x, r = _leaf(3, 16, dtype=torch.float64), _leaf(3, 16, dtype=torch.float64)
    inputs = (x, r, _leaf(16, dtype=torch.float64)) if with_weight else (x, r)

    def f(x, r, w=None):
        return cn.fused_add_rms_norm(x, r, w, 1e-5, **kwargs)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("kwargs,with_weight", GRAD_CASES)
def test_grads_match_reference_fp32(kwargs, with_weight):
    x = _leaf(4, 5, 96, dtype=torch.float32)
    w = _leaf(96, dtype=torch.float32) if with_weight else None
    leaves = (x, w) if with_weight else (x,)
    g = randn(4, 5, 96)
    got = torch.autograd.grad(cn.rms_norm(x, w, EPS, **kwargs), leaves, g)
    want = torch.autograd.grad(rms_norm_ref(x, w, EPS, **kwargs), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    r = _leaf(4, 5, 96, dtype=torch.float32)
    leaves = (x, r, *leaves[1:])
    g_h = randn(4, 5, 96)  # residual_out feeds the next layer: its gradient flows back too
    y, h = cn.fused_add_rms_norm(x, r, w, EPS, **kwargs)
    got = torch.autograd.grad((y, h), leaves, (g, g_h))
    y, h = fused_add_rms_norm_ref(x, r, w, EPS, **kwargs)
    want = torch.autograd.grad((y, h), leaves, (g, g_h))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grad_dtypes_bf16():
    x = _leaf(3, 96, dtype=torch.bfloat16)
    w = _leaf(96, dtype=torch.float32)
    gx, gw = torch.autograd.grad(cn.rms_norm(x, w, EPS, weight_offset=1.0).sum(), (x, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    want = torch.autograd.grad(rms_norm_ref(x, w, EPS, weight_offset=1.0).sum(), (x, w))
    torch.testing.assert_close(gx, want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, want[1], rtol=2e-2, atol=2e-2)
