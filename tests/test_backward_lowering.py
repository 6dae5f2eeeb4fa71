"""The lower pass gives ``rms_norm_backward`` (the backward graph's op in training) its
implementation: generated code (the reference inlined) or the Triton backward kernels as a
user-defined kernel (the ``wrap_triton`` launches of ``library_ops.functions()``, traced as
AOTAutograd traces a triton_op), chosen by ``lowerings.choice`` (CUDA only for the kernel).

On CPU: graphs are traced with fake CUDA tensors and their structure is checked (what the
lower pass hands to Inductor), Triton's mutation analysis answered from the kernels'
constexprs; the CUDA tests run the lowered kernels and compare with the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import compile_norm  # noqa: F401
from compile_norm.kernels import library_ops, triton_backward, triton_ops
from compile_norm.lowerings import choice
from compile_norm.ops import registry
from compile_norm.ops.norm import rms_norm_backward_ref
from compile_norm.options import parse_options
from compile_norm.passes import lower

from helpers import interpreter_report
from test_kernel_choice import BF16, cn_nodes, empty_measurements, fake_cuda, kernel_nodes  # noqa: F401

cn = torch.ops.compile_norm
needs_triton = pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")


@pytest.fixture
def backward_as_if_on_gpu(monkeypatch):
    """The triton providers registered as supported, an SM count without a device, and
    Triton's mutation analysis answered from the kernels' constexprs."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if not hasattr(tkw, "get_mutated_tensors"):
        pytest.skip("this torch has another mutation-analysis entry point")
    op = triton_backward.OP
    saved = {name: registry.providers(name).get("triton") for name in registry.ops()}
    plain = {name: pair for name, pair in triton_ops.FUNCTIONS.items()}
    plain[op] = (triton_backward.rms_norm_backward, triton_backward.supports)
    for name, (fn, supports) in plain.items():
        registry.register_provider(name, registry.Provider(name="triton", fn=fn, supported=True, supports=supports, rank=10))
    monkeypatch.setattr(triton_backward, "_sm_count", lambda index: 132)

    def mutated(kernel_idx, constant_args_idx, kwargs, tma):
        kernel = tkw.kernel_side_table.get_kernel(kernel_idx)
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "")
        consts = {**kwargs, **tkw.kernel_side_table.get_constant_args(constant_args_idx)}
        if name in ("rms_norm_backward_kernel", "dweight_reduce_kernel"):
            return triton_backward.written_args(name, consts)
        return library_ops.written_args(consts)

    monkeypatch.setattr(tkw, "get_mutated_tensors", mutated)
    yield
    for name, prov in saved.items():
        if prov is not None:
            registry.register_provider(name, prov)


def backward_graph(t, h, weight=True, residual=False, dtype=BF16):
    shapes = [(t, h), (t, h)] + ([(h,)] if weight else []) + ([(t, h)] if residual else [])
    mode, fakes = fake_cuda(*shapes, dtype=dtype)
    g, x = fakes[:2]
    w = fakes[2] if weight else None
    gr = fakes[-1] if residual else None

    def f(g, x, *rest):
        return cn.rms_norm_backward(g, x, w if not weight else rest[0], 1e-6, 0.0, None,
                                    rest[-1] if residual else None)

    with mode:
        return make_fx(f)(g, x, *fakes[2:]).graph


def kernel_names(graph):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for k in kernel_nodes(graph):
        kernel = kernel_side_table.get_kernel(k.kwargs["kernel_idx"])
        names.append(getattr(kernel, "fn", kernel).__name__)
    return names


@needs_triton
@pytest.mark.parametrize("t,h,weight,residual", [
    (2048, 4096, True, False), (2048, 5376, True, True), (2048, 2304, False, True),
    (1, 4096, True, False), (4, 128, True, False),  # one program: it stores dweight itself
], ids=["pow2", "npow2_residual", "weightless_residual", "decode", "per_head_decode"])
def test_kernel_lowering_is_the_backward_kernels(backward_as_if_on_gpu, t, h, weight, residual):
    graph = backward_graph(t, h, weight, residual)
    result = lower.LowerPass().run(graph, parse_options({"lowering": "kernel"}))
    graph.lint()
    assert result.matched == 1 and not cn_nodes(graph)
    want = ["rms_norm_backward_kernel"] + (["dweight_reduce_kernel"] if weight and t > 4 else [])
    assert kernel_names(graph) == want
    dx, dw = [n for n in graph.nodes if n.op == "output"][0].args[0]
    assert dx.meta["val"].shape == (t, h) and dx.meta["val"].dtype == BF16
    assert (dw is None) == (not weight)
    if weight:
        assert dw.meta["val"].shape == (h,) and dw.meta["val"].dtype == BF16


@needs_triton
@pytest.mark.parametrize("t,h,how,invariant", [
    (8192, 4096, "kernel", True), (2048, 5376, "kernel", True), (65536, 128, "generated", True),
    (256, 4096, "kernel", True),  # batch invariant (default): the bulk entry for every T
    (256, 4096, "generated", False),  # per token count: the decode entry
])
def test_auto_follows_the_table(backward_as_if_on_gpu, monkeypatch, t, h, how, invariant):
    from compile_norm.lowerings import choice

    monkeypatch.setattr(choice, "inductor_has", lambda name: True)  # as on torch >= 2.12
    graph = backward_graph(t, h)
    options = parse_options({"lowering": "auto", "measure": False, "batch_invariant": invariant})
    assert lower.LowerPass().run(graph, options).matched == 1
    assert not cn_nodes(graph)
    assert bool(kernel_nodes(graph)) == (how == "kernel")
    if how == "generated":  # the reference inlined: ATen ops for Inductor to fuse
        assert any(n.target is torch.ops.aten.rsqrt.default for n in graph.nodes)


INTERPRETER_CASES = {  # name: (shape, weight, grad_residual)
    "npow2_residual_3d": ((3, 7, 200), True, True),
    "weightless_residual": ((5, 256), False, True),
    "small_rows": ((40, 96), True, False),
}


def _child() -> None:
    """Under TRITON_INTERPRET=1 (a child process): the traced body (wrap_triton launches, run
    eagerly here) equals the eager provider bit for bit and the reference within fp32 noise."""
    import json

    assert triton_backward.SUPPORTED and triton_ops.INTERPRET, triton_backward.REASON
    body = library_ops.functions()["rms_norm_backward"]
    try:
        from torch._library.triton import wrap_triton

        from compile_norm.kernels import triton_backward_kernel

        wrap_triton(triton_backward_kernel.rms_norm_backward_kernel)
    except RuntimeError as e:  # torch 2.11: wrap_triton refuses the interpreter's functions
        print("REPORT" + json.dumps({"skip": f"torch {torch.__version__}: {e}"}))
        return
    report = {}
    for name, (shape, weight, residual) in INTERPRETER_CASES.items():
        torch.manual_seed(0)
        x = torch.randn(shape)
        g, gr = torch.randn_like(x), (torch.randn_like(x) if residual else None)
        w = 1 + 0.1 * torch.randn(shape[-1]) if weight else None
        got = body(g, x, w, 1e-6, 0.0, None, gr)
        eager = triton_backward.rms_norm_backward(g, x, w, 1e-6, 0.0, None, gr)
        ref = rms_norm_backward_ref(g, x, w, 1e-6, 0.0, None, gr)
        same = torch.equal(got[0], eager[0]) and (w is None or torch.equal(got[1], eager[1]))
        close = torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-4) and (
            w is None or torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-4))
        report[name] = dict(same_as_provider=same, close_to_reference=close, dweight_none=got[1] is None)
    print("REPORT" + json.dumps(report))


@needs_triton
def test_traced_body_runs_under_the_interpreter():
    report = interpreter_report(__file__, timeout=600)
    if "skip" in report:
        pytest.skip(report["skip"])
    assert set(report) == set(INTERPRETER_CASES)
    for name, (_, weight, _) in INTERPRETER_CASES.items():
        assert report[name] == dict(same_as_provider=True, close_to_reference=True, dweight_none=not weight), name


def test_cpu_backward_is_generated_code():
    x = torch.randn(8192, 4096, dtype=BF16)
    w = torch.randn(4096, dtype=BF16)
    how, why = choice.lowering_for("rms_norm_backward", [x, x, w, 1e-6, 0.0, None, None], "auto")
    assert how == choice.GENERATED, why


@pytest.mark.cuda
@pytest.mark.parametrize("h", [4096, 5376, 128])
@pytest.mark.parametrize("residual", [False, True])
def test_library_backward_runs_and_matches_the_reference(h, residual):
    torch.manual_seed(0)
    op = library_ops.functions()["rms_norm_backward"]  # what the lower pass traces
    x = torch.randn(300, h, device="cuda", dtype=BF16)
    g, gr = torch.randn_like(x), (torch.randn_like(x) if residual else None)
    w = (1 + 0.1 * torch.randn(h, device="cuda")).to(BF16)
    dx, dw = op(g, x, w, 1e-6, 0.0, None, gr)
    want_dx, want_dw = rms_norm_backward_ref(g.double(), x.double(), w.double(), 1e-6, 0.0, None,
                                             None if gr is None else gr.double())
    torch.testing.assert_close(dx.double(), want_dx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), want_dw, rtol=2e-2, atol=2e-2 * want_dw.abs().max().item())


@pytest.mark.cuda
def test_compiled_training_uses_the_backward_kernel():
    """fwd+bwd of the HF norm + residual add under the backend with lowering='kernel': the
    backward code launches the backward kernels; gradients match eager."""
    from torch._inductor.utils import run_and_get_code

    from compile_helpers import no_caches

    def hf_add(x, r, w):
        h = x + r
        hf = h.float()
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * y.to(x.dtype), h

    x = torch.randn(2048, 5376, device="cuda", dtype=BF16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = (1 + 0.1 * torch.randn(5376, device="cuda")).to(BF16).requires_grad_()
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    want = torch.autograd.grad(hf_add(x, r, w), (x, r, w), (dy, dh))
    torch._dynamo.reset()
    f = torch.compile(hf_add, backend="compile_norm", options={"lowering": "kernel", "strict": True})
    with no_caches():
        got, codes = run_and_get_code(lambda: torch.autograd.grad(f(x, r, w), (x, r, w), (dy, dh)))
    assert "rms_norm_backward_kernel" in codes[-1] and "dweight_reduce_kernel" in codes[-1]
    for a, b, name in zip(got, want, ("dx", "dr", "dw")):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)


if __name__ == "__main__":
    _child()
