"""Quant pass, per-group FP8 written without keepdim (DeepSeek / vLLM reference style):

    s = (g.abs().amax(-1) / 448).clamp(min=1 / (448 * 512))       # [..., H/g]
    q = (g / s.unsqueeze(-1)).clamp(-448, 448).to(fp8).reshape(y.shape)

must fuse into rms_norm_fp8_group / fused_add_rms_norm_fp8_group, and look-alikes that are not
per-group quantization must stay unfused (with a recorded reason) and correct."""

import pathlib
import sys

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, cn
from compile_helpers import compile_run_amax_left as run
from compile_norm.ops import registry

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

FP8 = torch.float8_e4m3fn
MIN_SCALE = 1.0 / (448.0 * 512.0)


def broadcast(s, form):
    """The no-keepdim scale ``[..., G]`` put back as ``[..., G, 1]`` in three spellings."""
    if form == "unsqueeze":
        return s.unsqueeze(-1)
    if form == "none_index":
        return s[..., None]
    return s.view(*s.shape, 1)


def group_quant(y, g, form="unsqueeze"):
    yf = y.float()
    groups = yf.reshape(*yf.shape[:-1], yf.shape[-1] // g, g)
    s = (groups.abs().amax(-1) / 448.0).clamp(min=MIN_SCALE)
    q = (groups / broadcast(s, form)).clamp(-448.0, 448.0).to(FP8).reshape(yf.shape)
    return q, s


def norm_group(x, r, w, g, form):
    return group_quant(cn.rms_norm(x, w, 1e-6), g, form)


def add_norm_group(x, r, w, g, form):
    y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
    q, s = group_quant(y, g, form)
    return q, s, h


def check_outputs(got, want, dtype):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == FP8:
            assert_close_q(a, b)
        else:
            assert_close(a, b, dtype)  # scales inherit y's rounding in x.dtype


CASES = [  # (x shape, group, spelling)
    ((5, 256), 128, "unsqueeze"),
    ((2, 3, 384), 64, "unsqueeze"),
    ((7, 384), 128, "none_index"),
    ((2, 3, 256), 64, "view"),
]


@pytest.mark.parametrize("shape, g, form", CASES, ids=[f"{s}-g{g}-{f}" for s, g, f in CASES])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_keepdim_group_fuses(shape, g, form, residual, dtype):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    fn = add_norm_group if residual else norm_group
    c, amax = run(fn, x, r, w, g, form, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.counts["quant_unmatched"] == 0, c.counts
    assert c.ops("quant", "after") == {"fused_add_rms_norm_fp8_group" if residual else "rms_norm_fp8_group"}
    assert not amax, "the hand-written amax reduction survived the quant pass"
    assert len(c.kernels) == 1, c.kernels
    want = fn(x, r, w, g, form)
    check_outputs(c.out, want, dtype)
    assert c.out[1].shape == (*shape[:-1], shape[-1] // g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_keepdim_group_fuses_on_strided_and_empty_input(dtype):
    x = torch.randn(6, 512, dtype=dtype)[:, ::2]  # non-contiguous rows
    w = torch.randn(256, dtype=dtype)
    for xs in (x, x[:0]):  # and zero tokens
        c, amax = run(norm_group, xs, None, w, 64, "unsqueeze", options={"strict": True})
        assert c.counts["quant_matched"] == 1 and not amax, c.counts
        check_outputs(c.out, norm_group(xs, None, w, 64, "unsqueeze"), dtype)


def test_no_keepdim_group_fuses_with_dynamic_tokens():
    w = torch.randn(384, dtype=torch.bfloat16)
    x = torch.randn(5, 384, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    c, amax = run(norm_group, x, None, w, 128, "unsqueeze", options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    check_outputs(c.out, norm_group(x, None, w, 128, "unsqueeze"), torch.bfloat16)


def scale_also_broadcast_elsewhere(x, r, w, g, form):
    """The unsqueezed scale is read again outside the quantization: it must see the op's scales."""
    yf = cn.rms_norm(x, w, 1e-6).float()
    groups = yf.reshape(*yf.shape[:-1], yf.shape[-1] // g, g)
    s = (groups.abs().amax(-1) / 448.0).clamp(min=MIN_SCALE)
    s1 = s.unsqueeze(-1)
    q = (groups / s1).clamp(-448.0, 448.0).to(FP8).reshape(yf.shape)
    return q, s1 * 2.0


def test_unsqueezed_scale_used_elsewhere_reads_the_op_scales():
    x, w = torch.randn(4, 256), torch.randn(256)
    c, amax = run(scale_also_broadcast_elsewhere, x, None, w, 128, "unsqueeze", options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    check_outputs(c.out, scale_also_broadcast_elsewhere(x, None, w, 128, "unsqueeze"), torch.float32)


@pytest.mark.parametrize("shape, dtype", [((4, 256), torch.bfloat16), ((2, 3, 384), torch.float32)])
def test_gpu_check_hf_fp8_group128_fuses(shape, dtype):
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    c, amax = run(gpu_check.hf_fp8_group128, x, w, options={"strict": True})
    assert c.counts["canonicalize_matched"] == 1, c.counts
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {"rms_norm_fp8_group"}
    assert not amax and len(c.kernels) == 1, c.kernels
    check_outputs(c.out, gpu_check.hf_fp8_group128(x, w), dtype)
    q_ref, s_ref = registry.ops()["rms_norm_fp8_group"].reference(x, w, gpu_check.EPS, 128)
    assert_close_q(c.out[0], q_ref)
    assert_close(c.out[1], s_ref, dtype)


def pow2_inverse_group(x, r, w, g, form):
    """torchao's rowwise training arithmetic (float64 inverse, EPS 1e-12, rounded down to a
    power of two) per group of g: fp8_group's shared scale arguments with pow2_inverse."""
    y = cn.rms_norm(x, w, 1e-6)
    groups = y.float().reshape(*y.shape[:-1], y.shape[-1] // g, g)
    amax = groups.abs().amax(-1, keepdim=True).to(torch.float64)
    r = (448.0 / torch.clamp(amax, min=1e-12)).to(torch.float32)
    r = torch.exp2(torch.floor(torch.log2(r)))
    return (groups * r).clamp(-448.0, 448.0).to(FP8).reshape(y.shape), r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pow2_inverse_group_fuses_bit_for_bit(dtype):
    x, w = torch.randn(3, 5, 384, dtype=dtype), torch.randn(384, dtype=dtype)
    x[0, 0] = 0.0
    c, amax = run(pow2_inverse_group, x, None, w, 64, None, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    assert c.ops("quant", "after") == {"rms_norm_fp8_group"}
    check_outputs(c.out, pow2_inverse_group(x, None, w, 64, None), dtype)
    q, r = pow2_inverse_group(x, None, w, 64, None)
    got = cn.rms_norm_fp8_group(x, w, 1e-6, 64, min_scale=1e-12, clamp_amax=True,
                                scale_form="inverse", pow2_inverse=True)
    assert torch.equal(got[0].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got[1], r.squeeze(-1))


# --- look-alikes that must not fuse -----------------------------------------------------------


def amax_over_group_index(x, r, w, g, form):
    """Scale per position inside the groups (amax over the group index), broadcast on dim -2."""
    yf = cn.rms_norm(x, w, 1e-6).float()
    groups = yf.reshape(*yf.shape[:-1], yf.shape[-1] // g, g)
    s = (groups.abs().amax(-2) / 448.0).clamp(min=MIN_SCALE)
    return (groups / s.unsqueeze(-2)).clamp(-448.0, 448.0).to(FP8).reshape(yf.shape), s


def unsqueeze_wrong_dim(x, r, w, g, form):
    """Per-group amax, but unsqueezed on dim -2: H = g * g makes it broadcast, transposed."""
    yf = cn.rms_norm(x, w, 1e-6).float()
    groups = yf.reshape(*yf.shape[:-1], yf.shape[-1] // g, g)
    s = (groups.abs().amax(-1) / 448.0).clamp(min=MIN_SCALE)
    return (groups / s.unsqueeze(-2)).clamp(-448.0, 448.0).to(FP8).reshape(yf.shape), s


def groups_used_elsewhere(x, r, w, g, form):
    """The grouped norm output is also summed: fusing would leave the norm computed twice."""
    yf = cn.rms_norm(x, w, 1e-6).float()
    groups = yf.reshape(*yf.shape[:-1], yf.shape[-1] // g, g)
    s = (groups.abs().amax(-1) / 448.0).clamp(min=MIN_SCALE)
    q = (groups / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(FP8).reshape(yf.shape)
    return q, s, groups.sum(-1)


NEGATIVE = [
    (amax_over_group_index, 64, "amax is not over the last dim"),
    (unsqueeze_wrong_dim, 16, "group scale does not divide its group as [..., H/g, 1]"),
    (groups_used_elsewhere, 64, "an intermediate of the quantization has other users"),
]


@pytest.mark.parametrize("fn, g, reason", NEGATIVE, ids=[f.__name__ for f, _, _ in NEGATIVE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_look_alikes_stay_unfused_and_correct(fn, g, reason, dtype):
    x, w = torch.randn(3, 256, dtype=dtype), torch.randn(256, dtype=dtype)
    c, amax = run(fn, x, None, w, g, "unsqueeze", options={"strict": True})
    assert c.counts.get("quant_matched", 0) == 0, c.counts
    assert any(k.startswith(f"quant_unmatched: {reason}") for k in c.counts), c.counts
    assert c.ops("quant", "after") == {"rms_norm"}
    assert amax, "the unfused quantization must keep its own reduction"
    check_outputs(c.out, fn(x, None, w, g, "unsqueeze"), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 384)])
def test_cuda_gpu_check_hf_fp8_group128_fuses(shape):
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(shape[-1], dtype=torch.bfloat16, device="cuda")
    c, amax = run(gpu_check.hf_fp8_group128, x, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {"rms_norm_fp8_group"} and not amax
    check_outputs(c.out, gpu_check.hf_fp8_group128(x, w), torch.bfloat16)
