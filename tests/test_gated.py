"""rms_norm_gated against transformers' gated norms (Qwen3-Next, Mamba-2), its autograd, and
the gated pass fusing those classes under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compile_helpers import TOL, compile_run
from helpers import assert_bitwise_equal, mamba2_gated_norm, qwen3_next_gated_norm

import compile_norm
from compile_norm.ops.gated import rms_norm_gated_ref

transformers = pytest.importorskip("transformers")
qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

EPS = 1e-6


def qwen_norm(h, dtype):
    return qwen3_next_gated_norm(h, dtype, EPS)


def mamba_norm(h, group, dtype, weight_dtype=None):
    return mamba2_gated_norm(h, group, dtype, EPS, weight_dtype)


def op_args(m, x, g):
    """The op call that the HF module ``m`` is."""
    if isinstance(m, qwen3_next.Qwen3NextRMSNormGated):
        return (x, g, m.weight.detach(), EPS)
    group = None if m.group_size == x.shape[-1] else m.group_size
    return (x, g, m.weight.detach(), EPS, False, group)


MODULES = [  # (id, make(h, dtype), hidden)
    ("qwen3_next", lambda h, dt: qwen_norm(h, dt), 96),
    ("mamba2_groups", lambda h, dt: mamba_norm(h, 32, dt), 96),
    ("mamba2_one_group", lambda h, dt: mamba_norm(h, h, dt), 80),
    ("mamba2_fp32_weight", lambda h, dt: mamba_norm(h, 16, dt, torch.float32), 64),
]


@pytest.mark.parametrize("make, h", [m[1:] for m in MODULES], ids=[m[0] for m in MODULES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_equals_the_transformers_class(make, h, dtype):
    m = make(h, dtype)
    x = torch.randn(2, 5, h).to(dtype)
    g = (3 * torch.randn(5, 2, h)).to(dtype).transpose(0, 1)  # non-contiguous gate
    with torch.no_grad():
        want = m(x, g)
    got = compile_norm.rms_norm_gated(*op_args(m, x, g))
    assert got.is_contiguous()
    assert_bitwise_equal(got, want)
    empty = compile_norm.rms_norm_gated(*op_args(m, x[:0], g[:0]))  # zero tokens
    assert empty.shape == (0, 5, h) and empty.dtype == want.dtype


@pytest.mark.parametrize("before, group", [(False, None), (True, None), (True, 16), (True, 48)])
@pytest.mark.parametrize("weight", [True, False])
def test_autograd_formula_matches_gradcheck(before, group, weight):
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(48, dtype=torch.float64, requires_grad=True) if weight else None
    fn = lambda x, g, w: compile_norm.rms_norm_gated(x, g, w, EPS, not before, group)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, g, w))


def test_bf16_gradients_follow_autograd_of_the_reference():
    x, g = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    for before, group in ((True, 16), (False, None)):
        args = (x.bfloat16(), g.bfloat16(), w.bfloat16())
        dy = torch.randn(4, 64).bfloat16()
        got = torch.autograd.grad(compile_norm.rms_norm_gated(*args, EPS, not before, group), args, dy)
        ref_args = [a.detach().float().requires_grad_() for a in args]
        ref = torch.autograd.grad(rms_norm_gated_ref(*ref_args, EPS, not before, group), ref_args, dy.float())
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gate=torch.randn(4, 32)), r"gate must have the shape of x \(4, 64\), got \(4, 32\)"),
    (dict(norm_before_gate=True, group_size=16), "group_size is only for the gate before the norm"),
    (dict(norm_before_gate=False, group_size=24), "group_size=24 must divide the hidden size"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    call = dict(x=torch.randn(4, 64), gate=torch.randn(4, 64), weight=None, eps=EPS)
    call.update(kwargs)
    with pytest.raises(ValueError, match=r"compile_norm\.rms_norm_gated: " + message):
        compile_norm.rms_norm_gated(**call)


# --- the gated pass


@pytest.mark.parametrize("make, h", [m[1:] for m in MODULES], ids=[m[0] for m in MODULES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_gated_norm_fuses(make, h, dtype):
    m = make(h, dtype)
    x, g = torch.randn(3, 4, h).to(dtype), torch.randn(3, 4, h).to(dtype)
    with torch.no_grad():
        c = compile_run(m, x, g, options={"strict": True})
        want = m(x, g)
    assert c.counts["gated_matched"] == 1 and c.counts["gated_unmatched"] == 0, c.counts
    assert c.ops("gated", "after") == {"rms_norm_gated"}
    assert len(c.kernels) == 1, c.kernels  # norm, gate and weight in one generated kernel
    # generated code: SiLU's exp is Inductor's, and Inductor keeps the x.dtype rounding of
    # y in float32 before a float32 weight (no precision-cast emulation): ulps of x.dtype
    torch.testing.assert_close(c.out, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert_bitwise_equal(compile_norm.rms_norm_gated(*op_args(m, x, g)), want)


def gate_broadcast(x, g, w):
    """The gate is one row broadcast over the tokens: not the op's elementwise gate."""
    return compile_norm.rms_norm(x, w, EPS) * F.silu(g[:1])


def norm_reused(x, g, w):
    y = compile_norm.rms_norm(x, w, EPS)
    return y * F.silu(g), y.sum()


@pytest.mark.parametrize("fn, reason", [
    (gate_broadcast, "gate does not have the shape and dtype of x"),
    (norm_reused, "an intermediate of the gated norm has other users"),
])
def test_look_alikes_stay_unfused_with_a_reason(fn, reason):
    x, g, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    c = compile_run(fn, x, g, w, options={"strict": True})
    assert c.counts.get("gated_matched", 0) == 0, c.counts
    assert c.counts.get(f"gated_unmatched: {reason}") == 1, c.counts
    assert "rms_norm_gated" not in c.ops("gated", "after")
    want = fn(x, g, w)
    for a, b in zip(c.out if isinstance(c.out, tuple) else (c.out,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("make, h", [m[1:] for m in MODULES[:2]], ids=[m[0] for m in MODULES[:2]])
def test_cuda_transformers_gated_norm_fuses(make, h):
    m = make(h * 32, torch.bfloat16).cuda()
    x = torch.randn(64, h * 32, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(64, h * 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        c = compile_run(m, x, g, options={"strict": True})
        want = m(x, g)
    assert c.counts["gated_matched"] == 1, c.counts
    torch.testing.assert_close(c.out, want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
