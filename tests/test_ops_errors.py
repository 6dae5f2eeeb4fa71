"""Bad arguments raise a ValueError naming the argument, in eager and under torch.compile."""

import pytest
import torch
from helpers import cn, randn

EPS = 1e-6


def _x(*shape, dtype=torch.float32):
    return lambda: randn(*shape, dtype=dtype)


def _t(value, dtype=torch.float32, device="cpu"):
    return lambda: torch.tensor(value, dtype=dtype, device=device)


def _w(n, dtype=torch.float32, device="cpu"):
    return lambda: randn(n, dtype=dtype).to(device)


X = _x(4, 64)
S = _t(0.02)

# (id, call(*tensors), tensor factories, text the message must contain)
CASES = [
    ("weight_shape", lambda x, w: cn.rms_norm(x, w, EPS), [X, _w(63)],
     "compile_norm.rms_norm: weight must have shape (64,)"),
    ("weight_2d", lambda x, w: cn.rms_norm(x, w, EPS), [X, lambda: randn(1, 64)],
     "weight must have shape (64,)"),
    ("weight_int", lambda x, w: cn.rms_norm(x, w, EPS), [X, lambda: torch.arange(64, dtype=torch.int32)],
     "weight must be a floating-point tensor, got int32"),
    ("eps_negative", lambda x, w: cn.rms_norm(x, w, -1e-6), [X, _w(64)],
     "eps must be a finite float >= 0"),
    ("eps_nan", lambda x, w: cn.fused_add_rms_norm(x, x, w, float("nan")), [X, _w(64)],
     "compile_norm.fused_add_rms_norm: eps must be a finite float >= 0, got nan"),
    ("eps_inf", lambda x: cn.rms_norm_fp8_dynamic(x, None, float("inf")), [X],
     "eps must be a finite float >= 0, got inf"),
    ("x_int", lambda x: cn.rms_norm(x, None, EPS), [lambda: torch.randint(-5, 5, (4, 64))],
     "x must be float16, bfloat16, float32 or float64, got int64"),
    ("x_scalar", lambda x: cn.rms_norm(x, None, EPS), [_t(1.5)],
     "x must have at least one dimension"),
    ("quant_x_int", lambda x: cn.quant_int8_dynamic(x), [lambda: torch.randint(-5, 5, (4, 64), dtype=torch.int8)],
     "compile_norm.quant_int8_dynamic: x must be float16, bfloat16, float32 or float64, got int8"),
    ("quant_x_scalar", lambda x: cn.quant_fp8_dynamic(x), [_t(2.0)],
     "x must have at least one dimension"),
    ("residual_shape", lambda x, r, w: cn.fused_add_rms_norm(x, r, w, EPS), [X, _x(4, 32), _w(64)],
     "residual must have the shape of x (4, 64), got (4, 32)"),
    ("residual_dtype", lambda x, r, w: cn.fused_add_rms_norm(x, r, w, EPS), [X, _x(4, 64, dtype=torch.bfloat16), _w(64)],
     "residual must have the dtype of x (float32), got bfloat16"),
    ("fused_quant_residual_shape", lambda x, r: cn.fused_add_rms_norm_int8_dynamic(x, r, None, EPS), [X, _x(2, 4, 64)],
     "compile_norm.fused_add_rms_norm_int8_dynamic: residual must have the shape of x"),
    ("scale_dtype", lambda x, s: cn.quant_fp8_static(x, s), [X, _t(0.02, torch.float64)],
     "scale must be float32, got float64"),
    ("scale_numel", lambda x, s: cn.quant_fp8_static(x, s), [X, _t([0.02, 0.03])],
     "scale must have exactly one element (per-tensor), got shape (2,)"),
    ("fused_scale_numel", lambda x, w, s: cn.rms_norm_fp8_static(x, w, EPS, scale=s), [X, _w(64), lambda: torch.rand(4, 1)],
     "compile_norm.rms_norm_fp8_static: scale must have exactly one element"),
    ("int8_scale_dtype", lambda x, s: cn.quant_int8_static(x, s), [X, _t(0.02, torch.bfloat16)],
     "scale must be float32, got bfloat16"),
    ("azp_dtype", lambda x, s, z: cn.quant_int8_static(x, s, z), [X, S, _t(3, torch.int64)],
     "azp must be int32, got int64"),
    ("fused_azp_numel", lambda x, r, s, z: cn.fused_add_rms_norm_int8_static(x, r, None, EPS, scale=s, azp=z),
     [X, X, S, _t([1, 2], torch.int32)], "azp must have exactly one element"),
    ("scale_ub_dtype", lambda x, u: cn.quant_fp8_dynamic(x, u), [X, _t(1.0, torch.float16)],
     "scale_ub must be float32, got float16"),
    ("group_size_not_dividing", lambda x: cn.quant_fp8_group(x, group_size=64), [_x(4, 96)],
     "group_size=64 must divide the hidden size x.shape[-1]=96"),
    ("group_size_zero", lambda x: cn.quant_fp8_group(x, group_size=0), [X],
     "group_size must be a positive int, got 0"),
    ("fused_group_size_negative", lambda x, r, w: cn.fused_add_rms_norm_fp8_group(x, r, w, EPS, group_size=-128),
     [X, X, _w(64)], "group_size must be a positive int, got -128"),
    ("min_scale_zero", lambda x: cn.quant_fp8_dynamic(x, min_scale=0.0), [X],
     "min_scale must be a positive float or None, got 0.0"),
    ("scale_form_unknown", lambda x, w: cn.rms_norm_fp8_group(x, w, EPS, group_size=32, scale_form="recip"),
     [X, _w(64)], "scale_form must be one of ('divide', 'multiply', 'inverse'), got 'recip'"),
    ("inverse_clamps_amax", lambda x: cn.quant_fp8_dynamic(x, min_scale=1e-12, scale_form="inverse"),
     [X], "scale_form='inverse' clamps amax: pass clamp_amax=True with min_scale"),
    ("pow2_inverse_needs_inverse", lambda x: cn.quant_fp8_dynamic(x, pow2_inverse=True), [X],
     "pow2_inverse rounds the inverse scale: it needs scale_form='inverse', got 'divide'"),
    ("tensor_scale_in_x_dtype_not_inverse",
     lambda x, r, w: cn.fused_add_rms_norm_fp8_dynamic_tensor(x, r, w, EPS, scale_form="inverse",
                                                              min_scale=None, scale_in_x_dtype=True),
     [X, X, _w(64)], "scale_in_x_dtype applies to amax / 448, not to scale_form='inverse'"),
    ("static_scale_form_unknown", lambda x, s: cn.quant_fp8_static(x, s, scale_form="reciprocal"),
     [X, _t(0.02)], "scale_form must be one of ('divide', 'multiply', 'inverse'), got 'reciprocal'"),
    ("ue8m0_not_inverse", lambda x: cn.quant_fp8_group(x, 32, use_ue8m0=True, scale_form="inverse",
                                                       min_scale=None), [X],
     "use_ue8m0 rounds the scale amax / 448, not scale_form='inverse'"),
    ("variance_size_zero", lambda x, w: cn.rms_norm(x, w, EPS, variance_size=0), [X, _w(64)],
     "variance_size must be None or in [1, 64] (x.shape[-1]), got 0"),
    ("variance_size_too_big", lambda x: cn.rms_norm_int8_dynamic_asym(x, None, EPS, variance_size=65), [X],
     "variance_size must be None or in [1, 64]"),
    ("weight_offset_no_weight", lambda x: cn.rms_norm(x, None, EPS, weight_offset=1.0), [X],
     "weight_offset=1.0 needs a weight; weight is None"),
    ("weight_device", lambda x, w: cn.rms_norm(x, w, EPS), [X, _w(64, device="meta")],
     "weight must be on the device of x (cpu), got meta"),
    ("residual_device", lambda x, r: cn.fused_add_rms_norm(x, r, None, EPS), [X, lambda: torch.empty(4, 64, device="meta")],
     "residual must be on the device of x (cpu), got meta"),
    ("scale_device", lambda x, s: cn.quant_int8_static(x, s), [X, _t(0.02, device="meta")],
     "scale must be on the device of x (cpu), got meta"),
    ("scale_ub_device", lambda x, w, u: cn.rms_norm_fp8_dynamic(x, w, EPS, scale_ub=u), [X, _w(64), _t(1.0, device="meta")],
     "scale_ub must be on the device of x (cpu), got meta"),
]


def _messages(exc: BaseException):
    """The exception and its causes/contexts (Dynamo wraps errors raised while tracing)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("call,factories,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(call, factories, text, mode):
    tensors = [make() for make in factories]
    if mode == "eager":
        with pytest.raises(ValueError) as info:
            call(*tensors)
        assert text in str(info.value)
        return
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as info:
        compiled(*tensors)
    chain = _messages(info.value)
    assert any(text in str(e) for e in chain), [str(e)[:300] for e in chain]
    assert any(isinstance(e, ValueError) for e in chain)


def test_table_is_large():
    assert len(CASES) >= 20


def test_good_arguments_pass():
    # The same calls with the argument fixed do not raise (the table tests the checks,
    # not some unrelated failure).
    x, w, s = randn(4, 64), randn(64), torch.tensor(0.02)
    cn.rms_norm(x, w, 0.0, variance_size=64)
    cn.fused_add_rms_norm(x, x, w, EPS, weight_offset=1.0)
    cn.quant_fp8_static(x, s.reshape(1, 1))  # any one-element shape is per-tensor
    cn.quant_int8_static(x, s, torch.tensor([3], dtype=torch.int32))
    cn.quant_fp8_dynamic(x, torch.tensor(1.0))
    cn.quant_fp8_group(randn(4, 96), group_size=32)
    cn.rms_norm(torch.randn(64), None, EPS)
