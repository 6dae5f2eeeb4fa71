"""Fused norm + quantization ops equal the composition of their parts, bit for bit."""

import pytest
import torch
from helpers import DTYPES, SCHEME_NAMES, assert_bitwise_equal, op, randn, scheme_kwargs

from compile_norm.ops import registry

EPS = 1e-6


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _check_composition(scheme, x, r, w, qkw, **norm_kw):
    quant = op(f"quant_{scheme}")
    fused = _tuple(op(f"rms_norm_{scheme}")(x, w, EPS, **qkw, **norm_kw))
    expected = _tuple(quant(op("rms_norm")(x, w, EPS, **norm_kw), **qkw))
    assert_bitwise_equal(fused, expected)

    fused = _tuple(op(f"fused_add_rms_norm_{scheme}")(x, r, w, EPS, **qkw, **norm_kw))
    y, h = op("fused_add_rms_norm")(x, r, w, EPS, **norm_kw)
    assert_bitwise_equal(fused, (*_tuple(quant(y, **qkw)), h))
    assert_bitwise_equal(fused[-1], x + r)
    return fused


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_equals_composition(scheme, weight_offset, dtype):
    hidden = 2304  # 18 groups of 128, 36 of 64: not a power of two
    x = randn(2, 3, hidden, dtype=dtype, scale=2.0)
    r = randn(2, 3, hidden, dtype=dtype)
    w = randn(hidden, dtype=dtype, scale=0.5)
    for variant in (0, 1):
        qkw = scheme_kwargs(scheme, hidden, variant)
        _check_composition(scheme, x, r, w, qkw, weight_offset=weight_offset)
        # The weight reaches the quantized output (the test would notice a dropped weight).
        norm_quant = op(f"rms_norm_{scheme}")
        q = _tuple(norm_quant(x, w, EPS, **qkw, weight_offset=weight_offset))[0]
        q_flip = _tuple(norm_quant(x, w.flip(0), EPS, **qkw, weight_offset=weight_offset))[0]
        assert not torch.equal(q.view(torch.uint8), q_flip.view(torch.uint8))


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_fused_no_weight_variance_size_non_contiguous(scheme):
    hidden = 384
    x = randn(hidden * 2, 5, dtype=torch.bfloat16).t()[:, ::2]  # transposed and strided
    r = randn(5, hidden, dtype=torch.bfloat16)
    qkw = scheme_kwargs(scheme, hidden, 1)
    _check_composition(scheme, x, r, None, qkw, variance_size=100)
    fused = _check_composition(scheme, x, r, randn(hidden, dtype=torch.float32), qkw, weight_offset=1.0)
    assert fused[0].is_contiguous() and fused[-1].is_contiguous()


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("shape", [(0, 128), (3, 0, 128), (128,)], ids=str)
def test_fused_zero_tokens_and_1d(scheme, shape):
    x = randn(*shape, dtype=torch.float16)
    r = randn(*shape, dtype=torch.float16)
    w = randn(128, dtype=torch.float16)
    qkw = scheme_kwargs(scheme, 128, 0)
    fused = _check_composition(scheme, x, r, w, qkw)
    assert fused[0].shape == shape and fused[-1].shape == shape


def test_references_are_compositions():
    # The registered references themselves (what kernels are tested against) compose too.
    x, r, w = randn(4, 256), randn(4, 256), randn(256)
    ops = registry.ops()
    for scheme in SCHEME_NAMES:
        qkw = scheme_kwargs(scheme, 256, 1)
        quant_ref = ops[f"quant_{scheme}"].reference
        norm_ref = ops["rms_norm"].reference
        got = _tuple(ops[f"rms_norm_{scheme}"].reference(x, w, EPS, **qkw, weight_offset=1.0))
        assert_bitwise_equal(got, _tuple(quant_ref(norm_ref(x, w, EPS, 1.0), **qkw)))
        got = _tuple(ops[f"fused_add_rms_norm_{scheme}"].reference(x, r, w, EPS, **qkw))
        y, h = ops["fused_add_rms_norm"].reference(x, r, w, EPS)
        assert_bitwise_equal(got, (*_tuple(quant_ref(y, **qkw)), h))


def test_positional_scheme_arguments():
    # Scheme arguments sit between eps and weight_offset in the schema.
    x, r, w = randn(3, 128), randn(3, 128), randn(128)
    s = torch.tensor(0.02)
    azp = torch.tensor(-3, dtype=torch.int32)
    assert_bitwise_equal(
        op("rms_norm_int8_static")(x, w, EPS, s, azp, 1.0, 64),
        op("rms_norm_int8_static")(x, w, EPS, scale=s, azp=azp, weight_offset=1.0, variance_size=64),
    )
    assert_bitwise_equal(
        op("fused_add_rms_norm_fp8_group")(x, r, w, EPS, 64, True, True, 0.02, True, "multiply",
                                           True, False, 1.0),
        op("fused_add_rms_norm_fp8_group")(
            x, r, w, EPS, group_size=64, column_major_scales=True, use_ue8m0=True, min_scale=0.02,
            clamp_amax=True, scale_form="multiply", scale_in_x_dtype=True, weight_offset=1.0
        ),
    )
