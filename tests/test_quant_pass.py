import pytest
import torch

from compile_helpers import assert_close, assert_close_q, cn, compile_run

FP8 = torch.float8_e4m3fn
H = 48


def inputs(dtype=torch.bfloat16, shape=(5, H)):
    x = torch.randn(shape, dtype=dtype)
    return x, torch.randn_like(x), torch.randn(shape[-1], dtype=dtype)


# --- compile_norm quant ops -----------------------------------------------------------------


def op_static(x, r, w, s):
    return cn.quant_fp8_static(cn.rms_norm(x, w, 1e-6), s)


def op_add_dynamic(x, r, w, s):
    q, scale = cn.quant_int8_dynamic(cn.rms_norm(x + r, w, 1e-6))
    return q, scale, (x + r) * 3  # residual stream still used


def op_add_group(x, r, w, s):
    y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
    q, scales = cn.quant_fp8_group(y, 16, True)
    return q, scales, h


@pytest.mark.parametrize(
    "fn, fused_op",
    [
        (op_static, "rms_norm_fp8_static"),
        (op_add_dynamic, "fused_add_rms_norm_int8_dynamic"),
        (op_add_group, "fused_add_rms_norm_fp8_group"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_ops_fuse(fn, fused_op, dtype):
    x, r, w = inputs(dtype)
    s = torch.tensor(0.02)
    c = compile_run(fn, x, r, w, s, options={"strict": True})
    assert c.counts["quant_matched"] == 1
    assert c.ops("quant", "after") == {fused_op}
    assert len(c.kernels) == 1 and "compile_norm" not in c.code  # add + norm + quant: ONE kernel
    for got, want in zip(c.out, fn(x, r, w, s)):
        if got.dtype in (FP8, torch.int8):
            assert_close_q(got, want)
        else:
            assert_close(got, want, dtype)  # scales inherit y's rounding in x.dtype


# --- hand-written quantization ----------------------------------------------------------------


def fp8_static(x, r, w, s):
    y = cn.rms_norm(x + r, w, 1e-6)
    return (y.float() / s).clamp(-448, 448).to(FP8)


def fp8_dynamic(x, r, w, s):
    y = cn.rms_norm(x, w, 1e-6)
    scale = (y.float().abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return (y.float() / scale).clamp(-448, 448).to(FP8), scale


def int8_static(x, r, w, s):
    y = cn.rms_norm(x + r, w, 1e-6)
    azp = torch.tensor(3, dtype=torch.int32)
    return (torch.round(y.float() / s) + azp).clamp(-128, 127).to(torch.int8)


def fp8_reciprocal(x, r, w, s):
    y = cn.rms_norm(x, w, 1e-6)
    return (y.float() * (1.0 / s)).clamp(-448, 448).to(FP8)


def int8_dynamic(x, r, w, s):
    y = cn.rms_norm(x, w, 1e-6)
    yf = y.float()
    scale = (yf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
    return torch.round(yf / scale).clamp(-128, 127).to(torch.int8), scale


@pytest.mark.parametrize(
    "fn, fused_op",
    [
        (fp8_static, "fused_add_rms_norm_fp8_static"),
        (fp8_reciprocal, "rms_norm_fp8_static"),  # y * m: scale_form="inverse", m the scale
        (fp8_dynamic, "rms_norm_fp8_dynamic"),
        (int8_static, "fused_add_rms_norm_int8_static"),
        (int8_dynamic, "rms_norm_int8_dynamic"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hand_written_quant_fuses(fn, fused_op, dtype):
    x, r, w = inputs(dtype, (2, 3, H))
    s = torch.tensor(0.02)
    c = compile_run(fn, x, r, w, s, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {fused_op}
    assert len(c.kernels) == 1
    got, want = c.out, fn(x, r, w, s)
    if isinstance(got, tuple):
        assert_close_q(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=1e-6)
    else:
        assert_close_q(got, want)


def norm_used_elsewhere(x, r, w, s):
    y = cn.rms_norm(x, w, 1e-6)
    return (y.float() / s).clamp(-448, 448).to(FP8), y


def other_min_scale(x, r, w, s):
    y = cn.rms_norm(x, w, 1e-6)
    scale = (y.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-5)
    return torch.round(y.float() / scale).clamp(-128, 127).to(torch.int8), scale


@pytest.mark.parametrize(
    "fn, reason",
    [
        (norm_used_elsewhere, "norm output has other users"),
        (other_min_scale, "minimum scale 1e-05 differs from the op's 1e-10"),
    ],
)
def test_hand_written_guards_refuse(fn, reason):
    x, r, w = inputs()
    s = torch.tensor(0.02)
    c = compile_run(fn, x, r, w, s, options={"strict": True})
    assert c.counts.get("quant_matched", 0) == 0
    assert any(k.startswith(f"quant_unmatched: {reason}") for k in c.counts), c.counts
    got, want = c.out, fn(x, r, w, s)
    assert_close_q(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)


def test_quant_fusion_option_off():
    x, r, w = inputs()
    s = torch.tensor(0.02)
    c = compile_run(op_static, x, r, w, s, options={"quant_fusion": False})
    assert "quant_matched" not in c.counts
    assert c.ops("lower", "before") == {"rms_norm", "quant_fp8_static"}
    assert_close_q(c.out, op_static(x, r, w, s))


def fp8_group(x, r, w, s, g=16):
    y = cn.rms_norm(x + r, w, 1e-6)
    groups = y.float().view(*y.shape[:-1], y.shape[-1] // g, g)
    scale = (groups.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    q = (groups / scale).clamp(-448, 448).to(FP8).view(y.shape)
    return q, scale.squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hand_written_fp8_group_fuses(dtype):
    x, r, w = inputs(dtype, (2, 3, H))
    s = torch.tensor(0.02)
    c = compile_run(fp8_group, x, r, w, s, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {"fused_add_rms_norm_fp8_group"}
    assert len(c.kernels) == 1
    want = fp8_group(x, r, w, s)
    assert_close_q(c.out[0], want[0])
    assert_close(c.out[1], want[1], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [op_add_dynamic, fp8_dynamic, fp8_static])
def test_cuda_add_norm_quant_is_one_triton_kernel(fn):
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    r, w = torch.randn_like(x), torch.randn(256, dtype=torch.bfloat16, device="cuda")
    s = torch.tensor(0.02, device="cuda")
    # generated code: Inductor's own one kernel (auto may take ours: it is batch-invariant)
    c = compile_run(fn, x, r, w, s, options={"strict": True, "lowering": "generated"})
    assert c.counts["quant_matched"] == 1
    assert "compile_norm" not in c.code
    assert len(c.kernels) == 1, c.kernels
    got, want = c.out, fn(x, r, w, s)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, e in zip(got, want):
        if g.dtype in (FP8, torch.int8):
            assert_close_q(g, e)
        else:
            assert_close(g, e, torch.bfloat16)
