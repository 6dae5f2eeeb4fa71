"""The dynamic FP8 quantizers of the libraries users run, after a compile_norm norm: each
fuses into one norm + quant op whose arguments carry the library's scale arithmetic, and the
compiled results equal the eager function (the op with the arguments read from the graph
reproduces the eager codes and scales bit for bit; the compiled graph within Inductor's
rounding of the norm output).

vLLM is not installable here: its forms are written out below as vLLM computes them (the file
and function each mirrors is named). DeepSeek-V3's ``act_quant`` is a Triton kernel; its torch
form is written the same way. torchao (installed) runs for real in test_torchao_float8.py.
"""

from __future__ import annotations

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, cn, compile_run
from helpers import assert_bitwise_equal

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)  # vLLM's _FP8_MIN_SCALING_FACTOR


def vllm_per_token(x, w):
    """vllm/model_executor/layers/quantization/input_quant_fp8.py, QuantFP8.forward_native,
    dynamic per-token branch (no scale_ub)."""
    y = cn.rms_norm(x, w, 1e-6)
    x_max, _ = y.abs().max(dim=-1)
    x_max = x_max.unsqueeze(-1).to(torch.float32)
    scale = (x_max / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    out = (y.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return out, scale


def vllm_per_token_group(x, w, group_size=128):
    """vllm/model_executor/layers/quantization/input_quant_fp8.py, QuantFP8._quantize_group_native
    (hidden a multiple of the group: no padding; row-major scales)."""
    y = cn.rms_norm(x, w, 1e-6)
    hidden = y.shape[-1]
    num_groups = hidden // group_size
    x_grouped = y.view(-1, num_groups, group_size)
    absmax = x_grouped.abs().max(dim=-1, keepdim=True)[0].float()
    scales = (absmax / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    x_quant = (x_grouped / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(-1, hidden)
    return x_quant, scales.reshape(y.shape[:-1] + (num_groups,))


def deepseek_act_quant(x, w, block_size=128):
    """DeepSeek-V3 inference/kernel.py, act_quant_kernel as torch: per block of 128,
    amax clamped to 1e-4, s = amax / 448, y = x / s cast to FP8 (no clamp)."""
    y = cn.rms_norm(x, w, 1e-6)
    g = y.float().view(*y.shape[:-1], y.shape[-1] // block_size, block_size)
    amax = g.abs().amax(-1).clamp(min=1e-4)
    s = amax / 448.0
    return (g / s.unsqueeze(-1)).to(FP8).view(y.shape), s


def deepseek_act_quant_no_clamp(x, w, block_size=128):
    """DeepSeek-V3 inference/kernel.py's first act_quant (no clamp of amax)."""
    y = cn.rms_norm(x, w, 1e-6)
    g = y.float().view(*y.shape[:-1], y.shape[-1] // block_size, block_size)
    s = g.abs().amax(-1) / 448.0
    return (g / s.unsqueeze(-1)).to(FP8).view(y.shape), s


def torchao_inference_row(x, w):
    """torchao quant_primitives._choose_scale_float8 + _quantize_affine_float8 (per row, no
    bounds): the scale computed in the activation's dtype."""
    y = cn.rms_norm(x, w, 1e-6)
    scale = (y.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def torchao_training_row(x, w):
    """torchao float8_utils.tensor_to_scale (axiswise, dim -1) -> amax_to_scale (float64,
    EPS 1e-12) and hp_tensor_and_scale_to_float8 (multiply, to_fp8_saturated)."""
    y = cn.rms_norm(x, w, 1e-6)
    amax = torch.amax(torch.abs(y), dim=-1, keepdim=True).to(torch.float64)
    scale = (FP8_MAX / torch.clamp(amax, min=1e-12)).to(torch.float32)
    return (y.to(torch.float32) * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp32_inverse(x, w):
    """An inverse scale computed in float32: 448 / amax rounds twice (reciprocal, multiply)."""
    y = cn.rms_norm(x, w, 1e-6)
    scale = FP8_MAX / y.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    return (y.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


FORMS = [  # (form, fused op, expected scheme arguments)
    (vllm_per_token, "rms_norm_fp8_dynamic", dict(scale_form="multiply")),
    (vllm_per_token_group, "rms_norm_fp8_group", dict(group_size=128)),
    (deepseek_act_quant, "rms_norm_fp8_group", dict(min_scale=1e-4, clamp_amax=True)),
    (deepseek_act_quant_no_clamp, "rms_norm_fp8_group", dict(min_scale=None)),
    (torchao_inference_row, "rms_norm_fp8_dynamic", dict(min_scale=None, scale_in_x_dtype=True)),
    (torchao_training_row, "rms_norm_fp8_dynamic",
     dict(min_scale=1e-12, clamp_amax=True, scale_form="inverse")),
]


def _close_q(got, want):
    """FP8 codes within one step, NaN (a zero token without a minimum scale) where eager has it."""
    nan = want.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    zero = torch.zeros((), dtype=want.dtype)
    assert_close_q(torch.where(nan, zero, got), torch.where(nan, zero, want))


@pytest.mark.parametrize("form, fused_op, expected", FORMS, ids=[f[0].__name__ for f in FORMS])
@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (5, 256)), (torch.float16, (2, 3, 384)),
                                          (torch.float32, (4, 640))])
def test_library_form_fuses_bit_for_bit(form, fused_op, expected, dtype, shape):
    if form is vllm_per_token_group and len(shape) == 3:
        shape = (6, shape[-1])  # vLLM flattens the tokens before its group view
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    x[0] = 0.0  # an all-zero token: the minimum (or its absence) decides its scale
    c = compile_run(form, x, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {fused_op}
    assert len(c.kernels) == 1, c.kernels
    want = form(x, w)
    # Inductor's generated norm keeps float32 where eager rounds y to x.dtype: codes within
    # one step, scales within y's rounding
    _close_q(c.out[0], want[0])
    assert_close(c.out[1], want[1], dtype)
    # the op, with the arguments the pass read, is the library's arithmetic bit for bit
    op = getattr(torch.ops.compile_norm, fused_op)
    got = op(x, w, 1e-6, **expected)
    assert_bitwise_equal(got[0].view(want[0].shape), want[0], nan_equal=True)
    assert_bitwise_equal(got[1].view(want[1].shape), want[1], nan_equal=True)


def test_float32_inverse_scale_is_refused_with_a_reason():
    x, w = torch.randn(4, 256), torch.randn(256)
    c = compile_run(fp32_inverse, x, w, options={"strict": True})
    assert c.counts.get("quant_matched", 0) == 0
    assert any(k.startswith("quant_unmatched: the inverse scale is computed in float32")
               for k in c.counts), c.counts
    q, scale = fp32_inverse(x, w)  # left to Inductor, whose 448 / amax is its own
    assert_close_q(c.out[0], q)
    assert_close(c.out[1], scale, torch.float32)


def test_inverse_scale_float32_equals_torchaos_float64():
    # The kernel's float32 448 / amax against torchao's float64 448 * (1 / amax): every
    # float32 of one binade, scaled to the extremes, and subnormals.
    a = (torch.arange(2 ** 23, dtype=torch.int32) + (127 << 23)).view(torch.float32)
    for values in (a, a * 2.0 ** -100, a * 2.0 ** 100, a[1:] * 2.0 ** -149 / 2.0 ** -149 * 2.0 ** -140):
        wide = (FP8_MAX * torch.reciprocal(values.double())).float()
        narrow = torch.tensor(FP8_MAX) / values
        assert torch.equal(wide.view(torch.int32), narrow.view(torch.int32))
