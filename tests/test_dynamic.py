"""Norms fuse under dynamic shapes: ``dynamic=True``, automatic dynamic shapes, ``mark_dynamic``.

Under ``dynamic=True`` Dynamo makes each norm's float ``eps`` a graph input; the backend has
Dynamo specialize exactly those (compile_norm/dynamic.py), so every norm fuses and one graph
serves every sequence length. Checked by the pass counters, Dynamo's graph count, the ops left
in the graph, generated kernels, and outputs against eager on fresh inputs.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.graph import GraphLowering

import models
from compile_helpers import KERNEL_RE, assert_close, no_caches
from compile_norm import dynamic
from compile_norm.lowerings import choice
from compile_norm.passes.base import observe_stages

SEQS = (7, 9, 13, 21)
HIDDEN = 40


class Block(nn.Module):
    """norm -> mixing -> residual add -> norm, with the norm class under test."""

    def __init__(self, norm_cls, hidden=HIDDEN, dtype=torch.float32):
        super().__init__()
        self.norm1 = norm_cls(hidden, eps=1e-6, dtype=dtype)
        self.norm2 = norm_cls(hidden, eps=1e-5, dtype=dtype)

    def forward(self, x):
        h = x + torch.tanh(self.norm1(x))
        return self.norm2(h)


def run_seqs(model, seqs=SEQS, dtype=torch.float32, mark=None, **compile_kwargs):
    """Compile once, call with every sequence length; (counts, graphs, codes) and each output
    checked against eager on a fresh input."""
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(model, backend="compile_norm", fullgraph=True, **compile_kwargs)
    codes = []  # what run_and_get_code collects, over several calls (it resets Dynamo)
    with torch.no_grad(), no_caches(), \
            mock.patch.object(GraphLowering, "save_output_code", codes.append):
        for seq in seqs:
            x = torch.randn(2, seq, HIDDEN, dtype=dtype)
            if mark is not None:
                torch._dynamo.mark_dynamic(x, mark)
            assert_close(f(x), model(x), dtype)
    return dict(counters["compile_norm"]), counters["stats"]["unique_graphs"], codes


@pytest.mark.parametrize("style", ["llama", "gemma", "nn_rmsnorm", "f_rms_norm"])
def test_dynamic_true_fuses_every_norm_in_one_graph(style):
    model = Block(models.NORMS[style]).eval()
    counts, graphs, codes = run_seqs(model, dynamic=True)
    assert graphs == 1, "one dynamic graph for every sequence length"
    assert counts["canonicalize_matched"] == 2 and counts["canonicalize_unmatched"] == 0, counts
    assert counts["residual_matched"] == 1 and counts["lower_matched"] == 2, counts
    (code,) = codes  # compiled once
    assert "ks0" in code or "s0" in code, "the graph is really dynamic"
    assert "compile_norm" not in code  # lowered to generated code (CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_automatic_dynamic_shapes_fuse_in_the_dynamic_graph(dtype):
    # The first call compiles a static graph, the second (another length) one dynamic graph
    # that serves 13 and 21 too; both fuse every norm.
    model = Block(models.LlamaRMSNorm, dtype=dtype).eval()
    counts, graphs, codes = run_seqs(model, dtype=dtype)
    assert graphs == 2 and len(codes) == 2
    assert counts["canonicalize_matched"] == 4 and counts["canonicalize_unmatched"] == 0, counts
    assert counts["residual_matched"] == 2, counts


def test_mark_dynamic_compiles_one_graph():
    model = Block(models.GemmaRMSNorm).eval()
    counts, graphs, _ = run_seqs(model, mark=1)
    assert graphs == 1
    assert counts["canonicalize_matched"] == 2 and counts["gemma_matched"] == 2, counts


def test_generated_kernels_match_the_static_compile():
    """The dynamic graph fuses the same way as the static one: as many generated kernels."""
    model = Block(models.LlamaRMSNorm).eval()
    _, _, static = run_seqs(model, seqs=(13,), dynamic=False)
    _, _, dyn = run_seqs(model, seqs=(13,), dynamic=True)
    assert len(KERNEL_RE.findall(dyn[0])) == len(KERNEL_RE.findall(static[0]))


def test_a_changed_eps_recompiles():
    """eps is specialized under a guard, as under dynamic=False: changing it is seen."""
    model = Block(models.LlamaRMSNorm).eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend="compile_norm", dynamic=True)
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad(), no_caches():
        f(x)
        model.norm1.variance_epsilon = 0.5  # large enough to move every output
        assert_close(f(x), model(x), torch.float32)
        assert counters["stats"]["unique_graphs"] >= 2


class ScaledNorm(nn.Module):
    """A norm's eps next to another float attribute (a scale) that is not an eps."""

    def __init__(self):
        super().__init__()
        self.norm = models.LlamaRMSNorm(HIDDEN)
        self.scale = 0.5

    def forward(self, x):
        return self.norm(x) * self.scale


def test_only_the_eps_is_specialized():
    model = ScaledNorm().eval()
    torch._dynamo.reset()
    counters.clear()
    traces = []  # (eps symbols, float inputs) of each graph Dynamo hands the backend

    def backend(gm, example_inputs):
        from compile_norm.backend import compile_norm_backend

        floats = [n for n in gm.graph.nodes if n.op == "placeholder" and dynamic._float_symbol(n)]
        traces.append((dynamic.eps_symbols(gm), len(floats)))
        return compile_norm_backend(gm, example_inputs)

    f = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad(), no_caches():
        x = torch.randn(2, 7, HIDDEN)
        f(x)
        model.scale = 0.25  # still a graph input: no recompile
        assert_close(f(x), model(x), torch.float32)
    # the first trace (eps and scale inputs) is restarted before anything is compiled; the
    # second has the scale only
    (eps, n_first), (none, n_second) = traces
    assert len(eps) == 1 and n_first == 2 and none == [] and n_second == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["compile_norm"]["canonicalize_matched"] == 1


def tensor_eps_norm(x, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_a_float_eps_input_another_backend_leaves_is_reported_and_strict_raises():
    # The pass itself, on a graph where eps is still the float64 input Dynamo makes of a
    # float (the specialization is the backend's; here the post-grad pass runs under
    # Inductor): reported, and an error under strict.
    from compile_norm.passes.manager import CompileNormPass, PassFailedError

    x = torch.randn(2, 7, HIDDEN)
    for strict in (False, True):
        torch._dynamo.reset()
        counters.clear()
        passes = CompileNormPass({"strict": strict})
        f = torch.compile(tensor_eps_norm, dynamic=True)
        with torch._inductor.config.patch(post_grad_custom_post_pass=passes), no_caches():
            if strict:
                with pytest.raises(Exception, match="left unfused under dynamic shapes: eps is a tensor"):
                    f(x, 1e-6)
            else:
                assert_close(f(x, 1e-6), tensor_eps_norm(x, 1e-6), torch.float32)
                reasons = [k for k in counters["compile_norm"] if k.startswith("canonicalize_unmatched: eps")]
                assert reasons and "dynamic=True" in reasons[0]
    assert PassFailedError  # the manager wraps the error (names the pass)


def test_a_real_tensor_eps_is_not_a_dynamic_shape_error():
    # eps a tensor the caller passes: not fusable (the op takes a float), reported, and not
    # an error under strict (it is not about dynamic shapes).
    x, eps = torch.randn(2, 7, HIDDEN), torch.tensor(1e-6)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(tensor_eps_norm, backend="compile_norm", dynamic=True, options={"strict": True})
    with no_caches():
        assert_close(f(x, eps), tensor_eps_norm(x, eps), torch.float32)
    assert counters["compile_norm"]["canonicalize_unmatched: eps is a tensor, not a constant"] == 1


@pytest.mark.parametrize("name, fused_op", [
    ("fp8_group", "fused_add_rms_norm_fp8_group"),  # its scale view holds the symbolic length
    ("fp8_dynamic", "rms_norm_fp8_dynamic"),
    ("int8_static", "fused_add_rms_norm_int8_static"),
])
def test_hand_written_quantization_fuses_with_a_dynamic_length(name, fused_op):
    import test_quant_pass as quant
    from compile_helpers import assert_close_q

    fn = getattr(quant, name)
    s = torch.tensor(0.02)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(fn, backend="compile_norm", options={"strict": True})
    with no_caches():
        for seq in (7, 13):
            x, r, w = quant.inputs(torch.bfloat16, (2, seq, quant.H))
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(r, 1)
            got, want = f(x, r, w, s), fn(x, r, w, s)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            assert_close_q(got[0], want[0])
            for g, e in zip(got[1:], want[1:]):
                torch.testing.assert_close(g, e, rtol=2e-2, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["compile_norm"]["quant_matched"] == 1, dict(counters["compile_norm"])
    assert not [k for k in counters["compile_norm"] if k.endswith("_failed")]


@pytest.mark.cuda
@pytest.mark.parametrize("lowering", ["kernel", "generated"])
def test_cuda_dynamic_graph_runs_the_chosen_lowering_for_every_length(lowering):
    """On the GPU under dynamic=True: one graph for 7, 9, 13, 21 x 2 tokens, the Triton kernel
    (as a user-defined kernel whose grid follows the token count) or generated code, equal to
    eager."""
    model = Block(models.LlamaRMSNorm, dtype=torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(model, backend="compile_norm", dynamic=True, fullgraph=True,
                      options={"lowering": lowering, "strict": True})
    codes = []
    with torch.no_grad(), no_caches(), \
            mock.patch.object(GraphLowering, "save_output_code", codes.append):
        for seq in SEQS:
            x = torch.randn(2, seq, HIDDEN, device="cuda", dtype=torch.bfloat16)
            assert_close(f(x), model(x), torch.bfloat16)
    assert counters["stats"]["unique_graphs"] == 1 and len(codes) == 1
    assert counters["compile_norm"]["canonicalize_matched"] == 2
    kernel = counters["compile_norm"]["lower_triton_kernel"]
    assert kernel == (2 if lowering == "kernel" else 0)
    assert ("norm_quant_kernel" in codes[0]) == (lowering == "kernel")


@pytest.mark.cuda
def test_cuda_auto_lowering_with_a_symbolic_token_count():
    """auto under dynamic=True: group FP8 at a power-of-two hidden size takes the kernel (the
    table picks it at every token class), the plain norm generated code."""
    import compile_norm

    class Norms(torch.nn.Module):
        # a parameter, as in a model: dynamic=True keeps its size (the hidden size) static,
        # where a plain tensor captured by the function would get a symbolic one too
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(1024, device="cuda", dtype=torch.bfloat16))

        def forward(self, x):
            q, s = compile_norm.ops.rms_norm_fp8_group(x, self.w, 1e-6, 128)
            return q, s, compile_norm.rms_norm(x, self.w, 1e-6)

    f = Norms().requires_grad_(False)
    torch._dynamo.reset()
    counters.clear()
    lowered = []  # (node, how, why) of the lower pass: the failure message says why
    g = torch.compile(f, backend="compile_norm", dynamic=True, options={"strict": True})
    observe = lambda stage, graph, result: lowered.extend(result.lowered if stage == "lower" and result is not None else ())  # noqa: E731
    with no_caches(), observe_stages(observe):
        for tokens in (7, 300, 5000):
            x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
            q, s, y = g(x)
            q0, s0, y0 = f(x)
            # the numerical contract: at most 1e-5 of the codes may differ (measured: 4 of 5.1M)
            differ = (q.view(torch.uint8) != q0.view(torch.uint8)).sum().item()
            assert torch.equal(s, s0) and differ <= 1e-5 * q.numel(), (tokens, differ)
            assert_close(y, y0, torch.bfloat16)
    assert counters["stats"]["unique_graphs"] == 1
    # without Inductor's batch_invariant setting (torch 2.11) the norm takes the kernel too
    kernels = 1 if choice.inductor_has("batch_invariant") else 2
    assert counters["compile_norm"]["lower_triton_kernel"] == kernels, lowered


transformers = pytest.importorskip("transformers")


def test_hf_llama_dynamic_true():
    """A Hugging Face Llama (1 layer) under dynamic=True: every norm fuses, one graph."""
    import test_hf_models as hf

    config = transformers.AutoConfig.for_model("llama", **dict(hf.TINY, num_hidden_layers=1))
    torch.manual_seed(0)
    model = hf.Logits(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")).eval()
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(model, backend="compile_norm", dynamic=True, fullgraph=True)
    with torch.no_grad(), no_caches():
        for seq in (7, 21):
            ids = torch.randint(0, hf.TINY["vocab_size"], (2, seq))
            torch.testing.assert_close(f(ids), model(ids), rtol=1e-5, atol=1e-5)
    counts = counters["compile_norm"]
    assert counters["stats"]["unique_graphs"] == 1
    assert counts["canonicalize_matched"] == 3 and counts["canonicalize_unmatched"] == 0, dict(counts)
    assert counts["residual_matched"] == 2, dict(counts)


DYNAMIC_FACTORY = '''
import torch

class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(40))
        self.eps = 1e-5  # a float attribute: a graph input under dynamic=True

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y

def build():
    return Norm(), torch.randn(2, 7, 40)
'''


def test_inspect_compiles_with_dynamic_shapes(tmp_path, capsys):
    import json

    from compile_norm.cli import main

    path = tmp_path / "factory.py"
    path.write_text(DYNAMIC_FACTORY)
    out = tmp_path / "out"
    rc = main(["inspect", f"{path}:build", "--dynamic", "--device", "cpu", "--graphs",
               "--out", str(out), "--options", '{"strict": true}'])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "dynamic shapes)" in stdout.splitlines()[0]
    assert "fused   rms_norm" in stdout
    data = json.loads((out / "report.json").read_text())
    assert data["dynamic"] is True
    texts = [n["text"] for n in data["graphs"][0]["stages"][0]["graph"]["nodes"]]
    assert any(re.search(r"\[s\d+, s\d+, 40\]", t) for t in texts), texts  # symbolic sizes
