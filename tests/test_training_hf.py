"""Training graphs of real Hugging Face models: every norm becomes a compile_norm op before
AOTAutograd, and the backward is the project's ``rms_norm_backward``.

The seven families of test_hf_models.py (same tiny two-layer configs, same expected counts) in
train mode, a cross-entropy loss, ``loss.backward()``. The backend here is the real pre-grad
pass (``PreGradPass``, what the compile_norm backend installs as Inductor's
``pre_grad_custom_pass``) followed by the real AOTAutograd, whose forward and backward graphs
are recorded and then run as they are (the ops dispatch to their CPU providers), so a test
costs a Dynamo trace and an AOTAutograd trace, not an Inductor compile per family. The full
backend (Inductor's codegen of the ops and of the backward op) is tested on the Llama-style
block in test_training.py and on Llama at the end of this file (slow).

Checked: the counters (every norm site rewritten, residual adds and Gemma ``1 + w`` folded, no
site left), the forward graph holds no ``rsqrt`` (no hand-written norm is left), the backward
graph holds one ``rms_norm_backward`` per norm and no other compile_norm op, the loss and every
parameter gradient equal eager's within fp32 1e-5 relative (bf16 and float8: stated below).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from compile_norm import lowerings
from compile_norm.passes.pre_grad import PreGradPass

import test_hf_models as hf
from compile_helpers import no_caches
from helpers import skip_without_cpu_rowwise_scaled_mm

transformers = pytest.importorskip("transformers")


class Recorder:
    """A torch.compile backend: the pre-grad pass, then AOTAutograd with the compile_norm ops
    kept (as the compile_norm backend keeps them); the graphs are recorded and run as is."""

    def __init__(self, options=None):
        self.options = {"strict": True, **(options or {})}
        self.graphs: list[torch.fx.GraphModule] = []
        self.inner = aot_autograd(fw_compiler=self.record, bw_compiler=self.record)

    def record(self, gm, example_inputs):
        self.graphs.append(gm)
        return make_boxed_func(gm)

    def __call__(self, gm, example_inputs):
        PreGradPass(self.options)(gm.graph)
        gm.recompile()
        with lowerings.keep_ops():
            return self.inner(gm, example_inputs)


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """``{op name: nodes}`` of the compile_norm ops and of ``rsqrt`` in a graph."""
    names = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "namespace", "") == "compile_norm":
            names[node.target._schema.name.split("::")[1]] += 1
        elif node.target is torch.ops.aten.rsqrt.default:
            names["rsqrt"] += 1
    return names


def loss_of(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


def step(model, ids, run=None):
    """Loss and parameter gradients of one step of ``run`` (``model`` itself, or compiled)."""
    loss = loss_of(model if run is None else run, ids)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def ids_for(device="cpu"):
    torch.manual_seed(1)
    return torch.randint(0, hf.TINY["vocab_size"], (hf.BATCH, hf.SEQ), device=device)


def compiled_step(model, ids, backend):
    torch._dynamo.reset()
    counters.clear()
    with no_caches():
        loss, grads = step(model, ids, torch.compile(model, backend=backend, fullgraph=True))
    return loss, grads, dict(counters["compile_norm"])


def check_rewrite(model_type, counts, graphs):
    family = hf.FAMILIES[model_type]
    assert counts.get("pre_grad_canonicalize_matched", 0) == family.norms, counts
    assert counts.get("pre_grad_residual_matched", 0) == family.residual, counts
    assert counts.get("pre_grad_gemma_matched", 0) == (family.norms if family.gemma else 0), counts
    left = {k: v for k, v in counts.items() if "unmatched" in k and v}
    assert not left, f"norm sites left alone: {left}"
    assert len(graphs) == 2, "one forward and one backward graph"
    forward, backward = (op_counts(g) for g in graphs)
    assert counts.get("pre_grad_sandwich_matched", 0) == family.sandwich, counts
    assert forward["rsqrt"] == 0, forward  # every norm is an op now
    sandwiches = forward["rms_norm_add_rms_norm"]  # two norms in one op
    assert sandwiches == family.sandwich, forward
    assert forward["rms_norm"] + forward["fused_add_rms_norm"] + 2 * sandwiches == family.norms, forward
    assert forward["fused_add_rms_norm"] + sandwiches == family.residual, forward
    assert backward == {"rms_norm_backward": family.norms}, backward  # a sandwich's: two


def assert_grads_close(got, want, rtol, atol_scale):
    """Each gradient within ``rtol`` of eager's plus ``atol_scale`` times its largest entry."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        atol = atol_scale * w.abs().max().item()
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("model_type", list(hf.FAMILIES))
def test_family_training_fp32(model_type):
    model = hf.build(model_type).train()
    ids = ids_for()
    want_loss, want = step(model, ids)
    backend = Recorder()
    loss, got, counts = compiled_step(model, ids, backend)
    check_rewrite(model_type, counts, backend.graphs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(got, want, rtol=1e-5, atol_scale=1e-5)


def test_bf16_training_gemma3():
    """bf16 on CPU, the family with the most norm kinds. The op computes the norm in fp32 with
    one rounding (eager rounds the product to bf16 first) and its backward treats roundings as
    identity, so compiled bf16 is not bitwise eager: it must be as close to the fp32 model's
    gradients as eager bf16 is (1.5x plus 1% of each gradient's scale)."""
    model = hf.build("gemma3_text").train()
    ids = ids_for()
    _, ref = step(model, ids)  # fp32
    model = model.to(torch.bfloat16)
    want_loss, want = step(model, ids)
    backend = Recorder()
    loss, got, counts = compiled_step(model, ids, backend)
    check_rewrite("gemma3_text", counts, backend.graphs)
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0)
    for name, r in ref.items():
        scale = r.abs().max().item()
        err_compiled = (got[name].float() - r).abs().max().item()
        err_eager = (want[name].float() - r).abs().max().item()
        assert err_compiled <= 1.5 * err_eager + 0.01 * scale, (name, err_compiled, err_eager, scale)


def test_no_grad_takes_the_inference_path():
    """Under torch.no_grad() (and for eval graphs without gradients) the pre-grad pass leaves
    the graph alone: the post-grad passes fuse the norms as in inference."""
    model = hf.build("llama").train()
    backend = Recorder()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), no_caches():
        torch.compile(model, backend=backend, fullgraph=True)(ids_for())
    assert not any(k.startswith("pre_grad") for k in counters["compile_norm"]), dict(counters["compile_norm"])
    (graph,) = backend.graphs
    assert op_counts(graph)["rsqrt"] == hf.FAMILIES["llama"].norms  # untouched hand-written norms


torchao_float8 = pytest.importorskip("torchao.float8")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_llama(recipe):
    """torchao float8 training (``convert_to_float8_training``): the linears are custom
    autograd.Functions over Float8TrainingTensor; they stay opaque calls (their own backward
    runs), and every norm around them still becomes an op. torch's scaled_mm runs on CPU, so
    this is a real run. The gradients pass through float8 casts of the norms' outputs, where
    an fp32 difference in the last bit can move a value by one e4m3 step: 5% relative, plus
    2% of each gradient's scale."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "rowwise":
        skip_without_cpu_rowwise_scaled_mm()
    model = hf.build("llama").train()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    ids = ids_for()
    want_loss, want = step(model, ids)
    backend = Recorder()
    loss, got, counts = compiled_step(model, ids, backend)
    check_rewrite("llama", counts, backend.graphs)
    forward = backend.graphs[0]
    assert any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_scaled_mm"
               for n in forward.graph.nodes) or "_scaled_mm" in forward.code, "the float8 matmuls"
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
    assert_grads_close(got, want, rtol=5e-2, atol_scale=2e-2)


class StraightThrough(torch.autograd.Function):
    """Rounds in forward, passes the gradient through unchanged: its backward is not the
    derivative of its forward ops, so a re-trace that inlined it would give other gradients."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad * 3.0


class NormSTE(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def forward(self, x):
        h = StraightThrough.apply(x)
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + 1e-6))


def test_custom_autograd_function_keeps_its_backward():
    model = NormSTE(40)
    x = torch.randn(3, 7, 40, requires_grad=True)

    def run(m):
        m(x).square().sum().backward()
        out = {"x": x.grad.clone(), "weight": model.weight.grad.clone()}
        x.grad = model.weight.grad = None
        return out

    want = run(model)
    backend = Recorder()
    torch._dynamo.reset()
    counters.clear()
    with no_caches():
        got = run(torch.compile(model, backend=backend, fullgraph=True))
    assert counters["compile_norm"]["pre_grad_canonicalize_matched"] == 1
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_failed_retrace_keeps_the_graph(monkeypatch):
    """A re-trace that fails leaves Dynamo's graph as it was (counted, with the reason): the
    step still runs, by autograd of the hand-written norm, with eager's gradients."""
    from compile_norm.passes import pre_grad

    def broken(gm, values):
        raise RuntimeError("no")

    monkeypatch.setattr(pre_grad, "retrace", broken)
    model = NormSTE(24)
    x = torch.randn(5, 24, requires_grad=True)
    model(x).sum().backward()
    want = model.weight.grad.clone()
    model.weight.grad = None
    backend = Recorder({"strict": False})
    torch._dynamo.reset()
    counters.clear()
    with no_caches():
        torch.compile(model, backend=backend)(x).sum().backward()
    assert counters["compile_norm"]["pre_grad_unmatched: re-tracing to ATen failed (RuntimeError)"] == 1
    assert op_counts(backend.graphs[0])["rsqrt"] == 1  # the hand-written norm, untouched
    torch.testing.assert_close(model.weight.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("COMPILE_NORM_SLOW") != "1",
                    reason="~1.5 min on a 2-core CPU: COMPILE_NORM_SLOW=1 runs it")
def test_llama_training_full_backend_fp32():
    """The compile_norm backend itself (Inductor codegen): counters, the backward op lowered
    (no compile_norm call left in the code), loss and gradients as eager."""
    from torch._inductor.utils import run_and_get_code

    model = hf.build("llama").train()
    ids = ids_for()
    want_loss, want = step(model, ids)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="compile_norm", fullgraph=True, options={"strict": True})
    with no_caches():
        (loss, got), codes = run_and_get_code(step, model, ids, compiled)
    counts = dict(counters["compile_norm"])
    norms = hf.FAMILIES["llama"].norms
    assert counts.get("pre_grad_canonicalize_matched") == norms, counts
    assert counts.get("lower_matched") == 2 * norms, counts  # forward ops and backward ops
    assert len(codes) == 2 and all("torch.ops.compile_norm" not in c for c in codes)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(got, want, rtol=1e-5, atol_scale=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("lowering", ["auto", "kernel"])
def test_family_training_full_backend_cuda_bf16(model_type, lowering):
    """On the GPU, bf16, the backend with each lowering (``kernel``: the Triton backward
    kernels for every backward op): every norm fused, the code launches no compile_norm op
    as an extern call, gradients as close to the fp32 model's as eager bf16 is (see
    test_bf16_training_gemma3)."""
    from torch._inductor.utils import run_and_get_code

    model = hf.build(model_type).train().cuda()
    ids = ids_for("cuda")
    _, ref = step(model, ids)
    model = model.to(torch.bfloat16)
    _, want = step(model, ids)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="compile_norm", fullgraph=True,
                             options={"strict": True, "lowering": lowering})
    with no_caches():
        (_, got), codes = run_and_get_code(step, model, ids, compiled)
    counts = dict(counters["compile_norm"])
    norms = hf.FAMILIES[model_type].norms
    assert counts.get("pre_grad_canonicalize_matched") == norms, counts
    # the forward ops (a sandwich is one op for two norms) and a backward op per norm
    assert counts.get("lower_matched") == 2 * norms - hf.FAMILIES[model_type].sandwich, counts
    assert all("torch.ops.compile_norm." not in c for c in codes)
    if lowering == "kernel":
        assert "rms_norm_backward_kernel" in codes[-1], "the backward kernels in the backward code"
    for name, r in ref.items():
        scale = r.abs().max().item()
        err_compiled = (got[name].float() - r).abs().max().item()
        err_eager = (want[name].float() - r).abs().max().item()
        assert err_compiled <= 1.5 * err_eager + 0.01 * scale, (name, err_compiled, err_eager, scale)
