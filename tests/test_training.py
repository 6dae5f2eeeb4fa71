"""Training: a Llama-style block's training step compiled with the backend matches eager.

Two blocks: the norm written the Hugging Face way, and the norm as compile_norm ops
(``rms_norm`` / ``fused_add_rms_norm``). Forward, loss and backward run compiled; loss and
every gradient match eager, and neither the forward nor the backward code calls a compile_norm
op as an extern kernel: the ops' autograd backward is traced into ATen ops and Inductor
generates its kernels.

In a training graph the hand-written norm's ``rsqrt`` (and its float32 input) are saved for
backward, so canonicalize leaves that norm as it is ("intermediate used elsewhere"): the
forward still becomes Inductor-generated fused code, just not through the compile_norm ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from compile_helpers import KERNEL_RE, TOL, no_caches

cn = torch.ops.compile_norm
EPS = 1e-6


class HFRMSNorm(nn.Module):
    def __init__(self, hidden, dtype):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden).to(dtype))

    def forward(self, h):
        input_dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + EPS)
        return self.weight * h.to(input_dtype)


class Block(nn.Module):
    """Llama decoder layer skeleton: norm, attention stand-in (a linear), residual add, norm,
    SwiGLU MLP, residual add, final norm."""

    def __init__(self, hidden, dtype, use_ops: bool):
        super().__init__()
        self.use_ops = use_ops
        self.norms = nn.ModuleList(HFRMSNorm(hidden, dtype) for _ in range(3))
        self.attn = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.gate = nn.Linear(hidden, 2 * hidden, bias=False, dtype=dtype)
        self.up = nn.Linear(hidden, 2 * hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(2 * hidden, hidden, bias=False, dtype=dtype)

    def mlp(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, x):
        n0, n1, n2 = self.norms
        if not self.use_ops:
            h = x + self.attn(n0(x))
            h = h + self.mlp(n1(h))
            return n2(h)
        y = cn.rms_norm(x, n0.weight, EPS)
        y, h = cn.fused_add_rms_norm(self.attn(y), x, n1.weight, EPS)
        y, h = cn.fused_add_rms_norm(self.mlp(y), h, n2.weight, EPS)
        return y


def step(model, x, target):
    loss = F.mse_loss(model(x).float(), target)
    loss.backward()
    return loss.detach()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run_both(use_ops, dtype, device="cpu", hidden=48):
    torch.manual_seed(0)
    model = Block(hidden, dtype, use_ops).to(device)
    x = torch.randn(2, 5, hidden, dtype=dtype, device=device, requires_grad=True)
    target = torch.randn(2, 5, hidden, device=device)

    want_loss = step(model, x, target)
    want = {**grads(model), "x": x.grad.clone()}
    model.zero_grad(set_to_none=True)
    x.grad = None

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="compile_norm", options={"strict": True})
    with no_caches():
        loss, codes = run_and_get_code(step, compiled, x, target)
    got = {**grads(model), "x": x.grad.clone()}
    return want_loss, loss, want, got, codes, dict(counters["compile_norm"])


def check(want_loss, loss, want, got, dtype):
    tol = TOL[dtype] * 4  # a whole step: forward, loss and backward, each rounding differently
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=tol)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("use_ops", [False, True], ids=["hf_norm", "compile_norm_ops"])
def test_training_step_matches_eager_cpu(use_ops):
    want_loss, loss, want, got, codes, counts = run_both(use_ops, torch.float32)
    check(want_loss, loss, want, got, torch.float32)
    assert len(codes) == 2, "one forward and one backward module"
    forward, backward = codes
    for code in codes:
        assert "torch.ops.compile_norm" not in code  # no extern call: generated code only
    kernels_bwd = KERNEL_RE.findall(backward)
    assert kernels_bwd, "the backward norms are generated kernels"
    # Fused: three norm backwards (+ residual grads, weight-grad reductions, SwiGLU grad) in a
    # handful of kernels, not one per ATen op (measured on CPU: 4 hf_norm, 3 ops forward;
    # 5 and 4 backward).
    assert len(kernels_bwd) <= 6 and len(KERNEL_RE.findall(forward)) <= 4
    if use_ops:
        # The three norms arrive as ops and are lowered by the lower pass (fused add included).
        assert counts.get("lower_matched", 0) == 3, counts
        # canonicalize sees the ops' traced backward (ATen) in the backward graph and leaves it.
    else:
        # Documented behaviour: the hand-written norms stay hand-written in training graphs.
        assert counts.get("canonicalize_matched", 0) == 0, counts
        assert any("used elsewhere" in k for k in counts), counts


@pytest.mark.cuda
@pytest.mark.parametrize("use_ops", [False, True], ids=["hf_norm", "compile_norm_ops"])
def test_training_step_matches_eager_cuda_bf16(use_ops):
    want_loss, loss, want, got, codes, counts = run_both(use_ops, torch.bfloat16, "cuda", hidden=320)
    check(want_loss, loss, want, got, torch.bfloat16)
    for code in codes:
        assert "torch.ops.compile_norm" not in code
        assert "@triton.jit" in code
