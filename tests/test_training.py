"""Training: a Llama-style block's training step compiled with the backend matches eager.

Two blocks: the norm written the Hugging Face way, and the norm as compile_norm ops
(``rms_norm`` / ``fused_add_rms_norm``). Forward, loss and backward run compiled; loss and
every gradient match eager.

Both arrive at AOTAutograd as the same ops: the pre-grad pass (passes/pre_grad.py) rewrites
the hand-written norms (and their residual adds) before autograd splits them, so the forward
graph holds ``rms_norm`` / ``fused_add_rms_norm``, their autograd formula saves x (or h) and
the weight, not the normalized tensor or rstd, and the backward graph holds
``rms_norm_backward`` (the fused add's residual gradient added inside it). The lower pass
lowers both graphs' ops; neither the forward nor the backward code calls a compile_norm op as
an extern kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from compile_helpers import KERNEL_RE, TOL, _op_names, no_caches
from compile_norm.passes.base import observe_stages

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
    inputs = []  # the compile_norm ops of each post-grad graph as it reaches the passes
    with no_caches(), observe_stages(
            lambda stage, g, _: stage == "input" and inputs.append(_op_names(g))):
        loss, codes = run_and_get_code(step, compiled, x, target)
    got = {**grads(model), "x": x.grad.clone()}
    counts = dict(counters["compile_norm"], graph_ops=inputs)
    return want_loss, loss, want, got, codes, counts


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
    # handful of kernels, not one per ATen op (measured on CPU: 3 forward, 4 backward).
    assert len(kernels_bwd) <= 5 and len(KERNEL_RE.findall(forward)) <= 4
    # Both blocks reach AOTAutograd as ops: forward and backward graphs hold the ops, the
    # lower pass lowers the three forward ops and the three backward ops.
    assert counts["graph_ops"] == [{"rms_norm", "fused_add_rms_norm"}, {"rms_norm_backward"}], counts
    assert counts.get("lower_matched", 0) == 6, counts
    if use_ops:
        assert not any(k.startswith("pre_grad") and v for k, v in counts.items() if k != "graph_ops"), counts
    else:
        # the hand-written norms and both residual adds, rewritten before autograd
        assert counts.get("pre_grad_canonicalize_matched") == 3, counts
        assert counts.get("pre_grad_residual_matched") == 2, counts
        assert counts.get("canonicalize_matched", 0) == 0, counts  # nothing left post-grad


def test_forward_saves_no_normalized_tensor():
    """The partitioner saves what the ops' autograd formulas save (x or h, the weight) and
    nothing per norm in the compute dtype: no rstd, no normalized tensor."""
    torch.manual_seed(0)
    model = Block(48, torch.bfloat16, use_ops=False)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    from test_training_hf import Recorder  # the pre-grad pass + AOTAutograd, graphs recorded

    backend = Recorder()
    torch._dynamo.reset()
    with no_caches():
        torch.compile(model, backend=backend)(x).float().sum().backward()
    forward = backend.graphs[0]
    outputs = forward.graph.find_nodes(op="output")[0].args[0]  # (block output, *saved)
    dtypes = [n.meta["val"].dtype for n in outputs[1:] if hasattr(n.meta.get("val"), "dtype")]
    assert torch.float32 not in dtypes, [(n.name, n.meta["val"].dtype) for n in outputs[1:]]


@pytest.mark.cuda
@pytest.mark.parametrize("use_ops", [False, True], ids=["hf_norm", "compile_norm_ops"])
def test_training_step_matches_eager_cuda_bf16(use_ops):
    want_loss, loss, want, got, codes, counts = run_both(use_ops, torch.bfloat16, "cuda", hidden=320)
    check(want_loss, loss, want, got, torch.bfloat16)
    for code in codes:
        assert "torch.ops.compile_norm" not in code
        assert "@triton.jit" in code


def test_unused_residual_out_gets_no_zeros_gradient():
    """The last layer's residual_out feeds nothing: its gradient is None, so the backward op
    gets no grad_residual (autograd would otherwise materialize a zeros tensor that is
    written and read again), and the gradients stay those of the reference."""
    import compile_norm
    from torch._functorch.aot_autograd import aot_function, make_boxed_func

    backward_graphs = []

    def keep_backward(gm, _):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    def f(x, r, w):
        y, _h = compile_norm.fused_add_rms_norm(x, r, w, 1e-6)
        return (y.float() * torch.arange(y.shape[-1])).sum()

    x, r = torch.randn(5, 96, requires_grad=True), torch.randn(5, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    forward = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    aot_function(f, fw_compiler=forward, bw_compiler=keep_backward)(x, r, w).backward()
    (graph,) = backward_graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    (bw,) = [n for n in calls if "rms_norm_backward" in str(n.target)]
    assert len(bw.args) < 7 or bw.args[6] is None, bw.args  # no grad_residual
    assert not [n for n in calls if "zeros" in str(n.target) or "full" in str(n.target)], calls
    got = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    xr = (x + r)
    ref = (compile_norm.ops.norm.rms_norm_ref(xr, w, 1e-6).float() * torch.arange(96)).sum()
    ref.backward()
    for g, t in zip(got, (x, r, w)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
