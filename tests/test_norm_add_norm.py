"""rms_norm_add_rms_norm (Gemma's sandwich: norm of x, residual add, norm of the sum) and the
sandwich pass that forms it.

The op is specified as the composition it replaces: its reference is ``rms_norm_ref`` then
``fused_add_rms_norm_ref``, and its kernel is the rms_norm kernel then the fused-add kernel,
bit for bit (the interpreter on the CPU, the GPU under ``-m cuda``), so every tolerance the
harness in compile_norm/kernels/checking.py proves for those two holds for it.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import compile_norm
from compile_norm.ops import norm as N
from compile_norm.ops import registry
from compile_helpers import assert_close, compile_run, inductor_cpu_rounds_like_eager
from helpers import assert_bitwise_equal, interpreter_report
from models import GemmaRMSNorm

OP = "rms_norm_add_rms_norm"
cn = torch.ops.compile_norm


def _inputs(shape, dtype, w_dtype=None, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    base = 0.0 if offset else 1.0
    w1 = (base + 0.1 * torch.randn(hidden, generator=g)).to(w_dtype or dtype)
    w2 = (base + 0.1 * torch.randn(hidden, generator=g)).to(w_dtype or dtype)
    return x, r, w1, w2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 3000), (0, 64)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reference_is_the_composition(dtype, shape, offset):
    x, r, w1, w2 = _inputs(shape, dtype, offset=offset)
    out, h = compile_norm.rms_norm_add_rms_norm(x, r, w1, 1e-6, w2, 1e-5, offset, offset)
    y1 = N.rms_norm_ref(x, w1, 1e-6, offset)
    want_out, want_h = N.fused_add_rms_norm_ref(y1, r, w2, 1e-5, offset)
    assert_bitwise_equal(out, want_out)
    assert_bitwise_equal(h, want_h)
    assert out.is_contiguous() and h.is_contiguous() and out.shape == x.shape


def test_non_contiguous_input_and_fp32_weights():
    x, r, w1, w2 = _inputs((5, 160), torch.bfloat16, w_dtype=torch.float32, offset=1.0)
    xt = torch.randn(160, 5).to(torch.bfloat16).t()  # strided rows
    out, h = compile_norm.rms_norm_add_rms_norm(xt, r, w1, 1e-6, w2, 1e-6, 1.0, 1.0)
    want_out, want_h = N.fused_add_rms_norm_ref(N.rms_norm_ref(xt, w1, 1e-6, 1.0), r, w2, 1e-6, 1.0)
    assert_bitwise_equal(out, want_out)
    assert_bitwise_equal(h, want_h)


@pytest.mark.parametrize("call, message", [
    (lambda x, r, w: compile_norm.rms_norm_add_rms_norm(x, r, w[:5], 1e-6, w, 1e-6),
     "x_weight must have shape (64,)"),
    (lambda x, r, w: compile_norm.rms_norm_add_rms_norm(x, r, w, -1.0, w, 1e-6), "x_eps must be"),
    (lambda x, r, w: compile_norm.rms_norm_add_rms_norm(x, r, None, 1e-6, w, 1e-6, 1.0),
     "x_weight_offset=1.0 needs a weight; x_weight is None"),
    (lambda x, r, w: compile_norm.rms_norm_add_rms_norm(x, r, w, 1e-6, w[:3], 1e-6),
     "weight must have shape (64,)"),
    (lambda x, r, w: compile_norm.rms_norm_add_rms_norm(x, r.float(), w, 1e-6, w, 1e-6),
     "residual must have the dtype of x"),
])
def test_bad_arguments_are_named(call, message):
    x, r, w, _ = _inputs((3, 64), torch.bfloat16)
    with pytest.raises(ValueError, match=f"compile_norm.{OP}: .*{message[:20]}") as e:
        call(x, r, w)
    assert message in str(e.value)


def test_gradcheck_float64():
    x, r, w1, w2 = (t.double().requires_grad_() for t in _inputs((4, 24), torch.float32))
    assert torch.autograd.gradcheck(
        lambda *a: N.rms_norm_add_rms_norm(a[0], a[1], a[2], 1e-6, a[3], 1e-5, 1.0, 0.5), (x, r, w1, w2))


@pytest.mark.parametrize("use", ["both", "out", "residual_out"])
def test_gradients_are_the_composed_ops(use):
    """The backward is the two norms' backwards: the same gradients as rms_norm then
    fused_add_rms_norm, bit for bit, with either output unused (its gradient None)."""
    def run(fn):
        x, r, w1, w2 = (t.requires_grad_() for t in _inputs((6, 80), torch.float32, seed=3))
        out, h = fn(x, r, w1, w2)
        loss = {"both": (out * out).sum() + h.sum() * 0.5, "out": (out * out).sum(),
                "residual_out": (h * h).sum()}[use]
        return torch.autograd.grad(loss, (x, r, w1, w2), allow_unused=True)

    fused = run(lambda x, r, w1, w2: N.rms_norm_add_rms_norm(x, r, w1, 1e-6, w2, 1e-6, 1.0, 1.0))
    composed = run(lambda x, r, w1, w2: N.fused_add_rms_norm(
        N.rms_norm(x, w1, 1e-6, 1.0), r, w2, 1e-6, 1.0))
    for got, want in zip(fused, composed):
        if want is None:
            assert got is None or not got.abs().sum()
        else:
            assert_bitwise_equal(got, want)


# --- the sandwich pass ----------------------------------------------------------------------


class Sandwich(nn.Module):
    """Gemma 3's decoder-layer pattern, hand-written as Hugging Face writes it: a block's
    output normalized, added to the residual, the sum normalized for the next block."""

    def __init__(self, hidden, dtype, extra_use=False):
        super().__init__()
        self.post = GemmaRMSNorm(hidden, eps=1e-6, dtype=dtype)
        self.pre = GemmaRMSNorm(hidden, eps=1e-5, dtype=dtype)
        self.extra_use = extra_use

    def forward(self, x, residual):
        normed = self.post(x)
        h = residual + normed
        out = self.pre(h)
        return (out, h, normed * 2) if self.extra_use else (out, h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pass_fuses_a_gemma_sandwich_into_one_kernel(dtype):
    torch.manual_seed(0)
    m = Sandwich(200, dtype)
    x, r = torch.randn(2, 5, 200, dtype=dtype), torch.randn(2, 5, 200, dtype=dtype)
    c = compile_run(m, x, r)
    assert c.counts["canonicalize_matched"] == 2 and c.counts["gemma_matched"] == 2
    assert c.counts["residual_matched"] == 1 and c.counts["sandwich_matched"] == 1
    assert c.ops("sandwich", "after") == {OP}
    assert c.ops("sandwich", "before") == {"rms_norm", "fused_add_rms_norm"}
    assert len(c.kernels) == 1, c.kernels  # on the CPU: generated code, both norms in one kernel
    with torch.no_grad():
        want = m(x, r)
    for got, ref in zip(c.out, want):
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        elif inductor_cpu_rounds_like_eager():
            assert_bitwise_equal(got, ref)
        else:  # torch 2.11's CPU code keeps fp32 between pointwise ops: stock's rounding
            assert_close(got, ref, dtype)


def test_pass_leaves_a_norm_with_other_users_and_says_why():
    torch.manual_seed(0)
    m = Sandwich(64, torch.float32, extra_use=True)
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    c = compile_run(m, x, r)
    assert c.counts["residual_matched"] == 1 and c.counts.get("sandwich_matched", 0) == 0
    assert c.counts["sandwich_unmatched"] == 1
    assert any("other users" in k for k in c.counts), c.counts
    with torch.no_grad():
        for got, ref in zip(c.out, m(x, r)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_pass_can_be_turned_off():
    m = Sandwich(64, torch.float32)
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    passes = ["canonicalize", "gemma", "residual", "lower"]
    c = compile_run(m, x, r, options={"passes": passes})
    assert "sandwich_matched" not in c.counts
    assert c.ops("residual", "after") == {"rms_norm", "fused_add_rms_norm"}


def test_training_graph_uses_the_op_and_its_backward():
    torch.manual_seed(0)
    m = Sandwich(96, torch.float32)
    m.requires_grad_(True)
    x = torch.randn(4, 96, requires_grad=True)
    r = torch.randn(4, 96, requires_grad=True)

    def step(x, r):
        out, h = m(x, r)
        return (out * out).sum() + (h * h).sum() * 0.25

    c = compile_run(lambda x, r: torch.autograd.grad(step(x, r), (x, r, *m.parameters())), x, r)
    assert c.counts["pre_grad_sandwich_matched"] == 1
    want = torch.autograd.grad(step(x, r), (x, r, *m.parameters()))
    for got, ref in zip(c.out, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --- the kernel -----------------------------------------------------------------------------


def _kernel_cases():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    for dtype in (bf16, f16, f32):
        for hidden in (128, 300, 1400, 3840):
            yield (5, hidden), dtype, None, 0.0
            yield (5, hidden), dtype, f32, 1.0
    yield (2, 3, 1400), bf16, None, 1.0  # 3-D
    yield (0, 256), bf16, None, 0.0  # zero tokens
    yield (1, 5376), bf16, f32, 1.0  # three column tiles, one row


def check_kernel_is_the_composition(device) -> list[dict]:
    """The kernel's outputs against the rms_norm kernel then the fused-add kernel."""
    from compile_norm.kernels import triton_ops as T

    results = []
    for i, (shape, dtype, w_dtype, offset) in enumerate(_kernel_cases()):
        x, r, w1, w2 = (t.to(device) for t in _inputs(shape, dtype, w_dtype, offset, seed=i))
        xs = torch.cat([x, x], -1)[..., ::2] if i % 4 == 1 else x  # some strided inputs
        out, h = T.run(registry.spec(OP), (xs, r, w1, 1e-6, w2, 1e-5, offset, offset))
        y1 = T.run(registry.spec("rms_norm"), (xs, w1, 1e-6, offset, None))
        want_out, want_h = T.run(registry.spec("fused_add_rms_norm"), (y1, r, w2, 1e-5, offset, None))
        ok = torch.equal(out, want_out) and torch.equal(h, want_h)
        results.append({"case": f"{shape} {dtype} w={w_dtype} offset={offset}", "ok": bool(ok)})
    return results


def test_kernel_is_the_composition_interpreter():
    report = interpreter_report(__file__, timeout=900)
    bad = [r for r in report["results"] if not r["ok"]]
    assert report["results"] and not bad, bad
    assert report["provider"] == "triton"
    assert report["unweighted"] != "triton" and report["unweighted_equal"], report


@pytest.mark.cuda
def test_kernel_is_the_composition_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    bad = [r for r in check_kernel_is_the_composition("cuda") if not r["ok"]]
    assert not bad, bad


@pytest.mark.cuda
def test_eager_call_is_one_kernel_launch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, r, w1, w2 = (t.cuda() for t in _inputs((64, 3840), torch.bfloat16, torch.float32, 1.0))

    def call():
        return compile_norm.rms_norm_add_rms_norm(x, r, w1, 1e-6, w2, 1e-6, 1.0, 1.0)

    assert registry.which_provider(OP, x, r, w1, 1e-6, w2, 1e-6, 1.0, 1.0) == "triton"
    call()  # compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, kernels


@pytest.mark.cuda
def test_compiled_sandwich_lowers_to_one_kernel_launch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    m = Sandwich(3840, torch.bfloat16).cuda()
    x = torch.randn(64, 3840, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(64, 3840, device="cuda", dtype=torch.bfloat16)
    c = compile_run(m, x, r, options={"lowering": "kernel"})
    assert c.counts["sandwich_matched"] == 1 and c.counts["lower_triton_kernel"] == 1
    assert [k.split("_0")[0] for k in c.kernels] == ["norm_quant_kernel"], c.kernels  # ours alone
    eager = compile_norm.rms_norm_add_rms_norm(
        x, r, m.post.weight, m.post.eps, m.pre.weight, m.pre.eps, 1.0, 1.0)
    for got, want in zip(c.out, eager):
        assert_bitwise_equal(got, want)


if __name__ == "__main__":  # the interpreter child of test_kernel_is_the_composition_interpreter
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    provider = registry.which_provider(OP, x, x, w, 1e-6, w, 1e-6)
    # no weight on x's norm: the kernel declines, the reference runs
    unweighted = registry.which_provider(OP, x, x, None, 1e-6, w, 1e-6)
    out, h = compile_norm.rms_norm_add_rms_norm(x, x, None, 1e-6, w, 1e-6)
    want = N.rms_norm_add_rms_norm_ref(x, x, None, 1e-6, w, 1e-6)
    print("REPORT" + json.dumps({"results": check_kernel_is_the_composition("cpu"),
                                 "provider": provider, "unweighted": unweighted,
                                 "unweighted_equal": torch.equal(out, want[0]) and torch.equal(h, want[1])}))
    sys.exit(0)
