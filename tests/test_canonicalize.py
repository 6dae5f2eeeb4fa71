"""canonicalize pass: the norms real models write become one compile_norm.rms_norm node.

Each test compiles with Inductor, the pass installed as post_grad_custom_post_pass, and checks
what the pass did to the real post-grad graph (match count, the new node's arguments, no rsqrt
left) and that the compiled output equals eager bit for bit. The rewritten node runs as
Inductor's fallback call of the op (no lowering exists on this branch), whose reference is the
numerical contract, so bit equality checks that the match is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from compile_helpers import assert_close, inductor_cpu_rounds_like_eager
from compile_norm.passes import canonicalize

try:
    from tests import models
except ImportError:  # pytest run with tests/ (not the repo root) on sys.path
    import models

aten = torch.ops.aten
RMS_NORM = torch.ops.compile_norm.rms_norm.default
LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Recorder(CustomGraphPass):
    """Runs the pass on every post-grad graph and keeps what it saw and did."""

    def __init__(self):
        self.results, self.before, self.after, self.nodes = [], [], [], []

    def __call__(self, graph):
        self.before.append(str(graph))
        self.results.append(canonicalize.CanonicalizePass().run(graph, None))
        graph.lint()
        self.after.append(str(graph))
        self.nodes.append(list(graph.nodes))

    def uuid(self):
        return None  # never cache: every test must run the pass

    def __deepcopy__(self, memo):
        return self  # Inductor copies its config; the recorder (holding graphs) is shared

    @property
    def matched(self):
        return sum(r.matched for r in self.results)

    @property
    def unmatched(self):
        return [u for r in self.results for u in r.unmatched]

    def calls(self, target):
        return [n for nodes in self.nodes for n in nodes if n.target is target]


def compile_run(fn, *args, dynamic=False, **inductor_config):
    torch._dynamo.reset()
    rec = Recorder()
    config = dict(post_grad_custom_post_pass=rec, fx_graph_cache=False, **inductor_config)
    with torch._inductor.config.patch(config):
        with torch.no_grad():
            out = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=dynamic)(*args)
    return out, rec


def eager(fn, *args):
    with torch.no_grad():
        return fn(*args)


def assert_equal(out, ref):
    if isinstance(out, tuple):
        for o, r in zip(out, ref):
            assert_equal(o, r)
        return
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


def fp32(v):
    return float(np.float32(v))


def assert_rewritten(rec, count, eps, variance_size=None):
    """``count`` rms_norm nodes with ``eps`` (compared as float32, as it is applied), no rsqrt."""
    assert rec.matched == count, rec.results
    assert rec.unmatched == []
    nodes = rec.calls(RMS_NORM)
    assert len(nodes) == count, rec.after
    assert rec.calls(aten.rsqrt.default) == []
    for n in nodes:
        _, _, node_eps, offset, vs = n.args
        assert fp32(node_eps) == fp32(eps)
        assert offset == 0.0 and vs == variance_size
    return nodes


def input_of(shape, dtype):
    return 3 * torch.randn(shape).to(dtype)


# Every style x dtype, over 2-D / 3-D / 4-D inputs with hidden sizes and eps that rotate with
# the dtype, so each (shape rank, H, eps) pairing is covered without a full product.
SHAPES = ((7,), (2, 5), (2, 3, 4))
HIDDEN = (96, 80, 128)
EPS = (1e-5, 1e-6, 3.3e-7)


def configs(dtype):
    k = DTYPES.index(dtype)
    return [(lead + (HIDDEN[(i + k) % 3],), EPS[(i + 2 * k) % 3]) for i, lead in enumerate(SHAPES)]


def expected_weight(style, dtype, weight_node, module):
    """What the pass must pass as weight: the contract reproduces each style exactly with it."""
    param = weight_node
    if style == "gemma":
        # (1.0 + weight.float()) in float32; the gemma pass folds it into weight_offset=1.0.
        assert weight_node.target is aten.add.Tensor and 1.0 in weight_node.args
        assert weight_node.meta["val"].dtype == torch.float32
        return
    if style in ("olmo2", "nn_rmsnorm", "f_rms_norm") and dtype in LOW:
        # weight applied in float32 before the final rounding: an up-cast of the 16-bit weight.
        assert weight_node.meta["val"].dtype == torch.float32
        param = weight_node.args[0]
        assert param.meta["val"].dtype == dtype
    else:
        # Llama / T5 round the normalized value to x.dtype, then multiply by the x.dtype weight.
        assert weight_node.meta["val"].dtype == dtype
    assert param.op == "placeholder"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("style", list(models.NORMS))
def test_model_norm(style, dtype):
    for shape, eps in configs(dtype):
        module = models.NORMS[style](shape[-1], eps=eps, dtype=dtype)
        x = input_of(shape, dtype)
        out, rec = compile_run(module, x)
        assert_equal(out, eager(module, x))
        (node,) = assert_rewritten(rec, 1, eps)
        assert node.args[0].op == "placeholder"  # x itself, not its float32 up-cast
        expected_weight(style, dtype, node.args[1], module)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("style", ["nn_rmsnorm", "f_rms_norm", "hand_written"])
def test_weightless(style, dtype):
    eps = 1e-5
    if style == "hand_written":

        def module(x):  # Mistral/Llama reference code's _norm, no weight
            var = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(var + eps)).type_as(x)

    else:
        module = models.NORMS[style](80, eps=eps, dtype=dtype, affine=False)
    x = input_of((3, 4, 80), dtype)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, eps)
    assert node.args[1] is None


@pytest.mark.parametrize("dtype", LOW, ids=IDS.get)
def test_qwen3_per_head_qk_norm(dtype):
    heads, head_dim = 3, 128
    module = models.Qwen3QKNorm(heads * head_dim, heads, head_dim, eps=1e-6, dtype=dtype)
    q, k = input_of((2, 5, heads * head_dim), dtype), input_of((2, 5, heads * head_dim), dtype)
    out, rec = compile_run(module, q, k)
    assert_equal(out, eager(module, q, k))
    for node in assert_rewritten(rec, 2, 1e-6):
        assert tuple(node.meta["val"].shape) == (2, 5, heads, head_dim)


def test_llama_block_norms():
    module = models.LlamaBlockNorms(96, eps=1e-5, dtype=torch.bfloat16)
    x = input_of((2, 3, 96), torch.bfloat16)
    # Inductor's code for the residual adds around the norms rounds like eager only with
    # emulate_precision_casts (otherwise it keeps tanh/silu outputs in float32).
    out, rec = compile_run(module, x, emulate_precision_casts=True)
    if inductor_cpu_rounds_like_eager():
        assert_equal(out, eager(module, x))
    else:  # torch 2.11's CPU code rounds the block's other ops unlike eager: ours can't be exact
        assert_close(out, eager(module, x), torch.bfloat16)
    assert_rewritten(rec, 3, 1e-5)


def test_dynamic_shapes():
    module = models.LlamaRMSNorm(96, eps=1e-6, dtype=torch.bfloat16)
    x = input_of((2, 7, 96), torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert not isinstance(node.meta["val"].shape[0], int)  # really symbolic


def test_dynamic_true_float_eps():
    # dynamic=True makes Dynamo pass float attributes (eps) as graph inputs, so eps is not a
    # constant the op can take: the site is reported with the config that keeps it one.
    module = models.LlamaRMSNorm(96, eps=1e-6, dtype=torch.bfloat16)
    x = input_of((2, 7, 96), torch.bfloat16)
    out, rec = compile_run(module, x, dynamic=True)
    torch.testing.assert_close(out, eager(module, x))
    assert rec.matched == 0
    ((_, why),) = rec.unmatched
    assert why.startswith("eps is a tensor, not a constant") and "specialize_float" in why
    with torch._dynamo.config.patch(specialize_float=True):
        out, rec = compile_run(module, x, dynamic=True)
    assert_equal(out, eager(module, x))
    assert_rewritten(rec, 1, 1e-6)


@pytest.mark.parametrize("style", ["llama", "f_rms_norm"])
def test_non_contiguous_input(style):
    norm = models.NORMS[style](80, eps=1e-6, dtype=torch.bfloat16)

    def fn(x):
        return norm(x.transpose(0, 1))

    x = input_of((4, 3, 80), torch.bfloat16)
    out, rec = compile_run(fn, x)
    assert_equal(out, eager(fn, x))
    assert_rewritten(rec, 1, 1e-6)
    if style == "f_rms_norm":  # its decomposition's .contiguous() clone sits in the tail
        assert "aten.clone" in rec.before[0]


def test_zero_tokens():
    module = models.LlamaRMSNorm(80, eps=1e-6, dtype=torch.bfloat16)
    x = input_of((0, 80), torch.bfloat16)
    out, rec = compile_run(module, x)
    assert out.shape == (0, 80) and out.dtype == torch.bfloat16
    assert_rewritten(rec, 1, 1e-6)


# ---- spellings of the same norm ---------------------------------------------------------


def _variant(kind, eps):
    def fn(x, w):
        xf = x.float()
        if kind == "mul_square":
            var = (xf * xf).mean(-1, keepdim=True)
        elif kind == "sum_div":
            var = xf.pow(2).sum(-1, keepdim=True) / x.shape[-1]
        elif kind == "last_dim_index":
            var = xf.pow(2).mean(x.dim() - 1, keepdim=True)
        else:
            var = xf.pow(2).mean(-1, keepdim=True)
        if kind == "pow_minus_half":
            r = torch.pow(var + eps, -0.5)
        elif kind == "no_eps":
            r = torch.rsqrt(var)
        else:
            r = torch.rsqrt(var + eps)
        return w * (xf * r).to(x.dtype)

    return fn


@pytest.mark.parametrize(
    "kind", ["mul_square", "sum_div", "last_dim_index", "pow_minus_half", "no_eps"]
)
def test_spellings(kind):
    eps = 0.0 if kind == "no_eps" else 1e-6
    fn = _variant(kind, eps)
    x, w = input_of((3, 5, 96), torch.bfloat16), input_of((96,), torch.bfloat16)
    out, rec = compile_run(fn, x, w)
    assert_equal(out, eager(fn, x, w))
    assert_rewritten(rec, 1, eps)


def test_variance_size():
    def fn(x, w):  # variance over the first 64 of 96 channels (padded hidden sizes)
        xf = x.float()
        var = xf[..., :64].pow(2).mean(-1, keepdim=True)
        return w * (xf * torch.rsqrt(var + 1e-6)).to(x.dtype)

    x, w = input_of((3, 96), torch.bfloat16), input_of((96,), torch.bfloat16)
    out, rec = compile_run(fn, x, w)
    assert_equal(out, eager(fn, x, w))
    assert_rewritten(rec, 1, 1e-6, variance_size=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_of_a_slice_is_not_variance_size(dtype):
    # The norm's input is itself x[..., :64] of a wider tensor (a model normalizing part of
    # its hidden state): fp32 input has no up-cast, so the squares read the slice directly.
    norm = models.LlamaRMSNorm(64, eps=1e-6, dtype=dtype)

    def fn(x):
        return norm(x[..., :64])

    x = input_of((3, 5, 96), dtype)
    out, rec = compile_run(fn, x)
    assert_equal(out, eager(fn, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert tuple(node.args[0].meta["val"].shape) == (3, 5, 64)


def test_float64_functional():
    module = models.FunctionalRMSNorm(80, eps=1e-6, dtype=torch.float64)
    x = input_of((3, 80), torch.float64)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert node.args[0].meta["val"].dtype == torch.float64


def test_float64_input_to_llama_norm():
    # Llama computes in float32 even for float64 input: the norm is matched on the float32
    # down-cast (float32 output), the up-cast and weight multiply stay in the graph.
    module = models.LlamaRMSNorm(80, eps=1e-6, dtype=torch.float64)
    x = input_of((3, 80), torch.float64)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert node.meta["val"].dtype == torch.float32 and node.args[1] is None


def test_t5_float32_weight_bf16_input():
    # No rounding to bf16 happens: the float32 result is the op applied to the float32 up-cast.
    module = models.T5LayerNorm(96, eps=1e-6, dtype=torch.float32)
    x = input_of((2, 3, 96), torch.bfloat16)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert node.meta["val"].dtype == torch.float32
    assert node.args[0].meta["val"].dtype == torch.float32
    assert node.args[1].op == "placeholder"


def test_llama_float32_weight_bf16_input():
    # w (fp32) * y.to(bf16): the contract would round y to w's dtype, so the weight multiply is
    # left in the graph after a weightless bf16 rms_norm.
    module = models.LlamaRMSNorm(96, eps=1e-6, dtype=torch.float32)
    x = input_of((2, 3, 96), torch.bfloat16)
    out, rec = compile_run(module, x)
    assert_equal(out, eager(module, x))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert node.args[1] is None and node.meta["val"].dtype == torch.bfloat16
    (user,) = node.users
    assert user.target is aten.mul.Tensor


def test_shared_normalized_value():
    # The bf16 normalized value feeds two weights (one statistic, two outputs): one weightless
    # norm replaces the statistics; both multiplies stay.
    def fn(x, w1, w2):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return w1 * y, w2 * y

    x = input_of((4, 96), torch.bfloat16)
    w1, w2 = input_of((96,), torch.bfloat16), input_of((96,), torch.bfloat16)
    out, rec = compile_run(fn, x, w1, w2)
    assert_equal(out, eager(fn, x, w1, w2))
    (node,) = assert_rewritten(rec, 1, 1e-6)
    assert node.args[1] is None and len(node.users) == 2


# ---- sites left alone ---------------------------------------------------------------------


def _negative(kind):
    def fn(x, w):
        xf = x.float()
        if kind == "non_last_dim":
            var = xf.pow(2).mean(-2, keepdim=True)
        elif kind == "two_dims":
            var = xf.pow(2).mean((-2, -1), keepdim=True)
        else:
            var = xf.pow(2).mean(-1, keepdim=kind != "no_keepdim")
        if kind == "bf16_statistics":
            var = x.pow(2).mean(-1, keepdim=True)
        r = torch.rsqrt(var + 1e-6)
        if kind == "no_keepdim":
            r = r.unsqueeze(-1)
        if kind == "other_tensor":
            return w * (w.float() * r).to(x.dtype)
        y = w * (xf * r).to(x.dtype)
        if kind == "variance_used":
            return y, var
        if kind == "rsqrt_used":
            return y, r
        if kind == "upcast_used":
            return y, xf
        return y

    return fn


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("variance_used", "intermediate used elsewhere"),
        ("rsqrt_used", "intermediate used elsewhere"),
        ("upcast_used", "intermediate used elsewhere"),
        ("non_last_dim", "reduction not over the last dim only"),
        ("two_dims", "reduction not over the last dim only"),
        ("no_keepdim", "mean without keepdim"),
        ("bf16_statistics", "statistics computed in torch.bfloat16"),
        ("other_tensor", "rsqrt(mean(x**2) + eps) multiplies another tensor"),
    ],
)
def test_left_alone(kind, reason):
    fn = _negative(kind)
    shape = (6, 6) if kind == "other_tensor" else (3, 6, 6)
    x, w = input_of(shape, torch.bfloat16), input_of((6,), torch.bfloat16)
    if kind == "other_tensor":
        w = input_of((6, 6), torch.bfloat16)
    out, rec = compile_run(fn, x, w)
    # Inductor's own code for the untouched norm is close to eager, not bit-equal (it keeps
    # values in float32 across a bf16 cast).
    torch.testing.assert_close(out, eager(fn, x, w))
    assert rec.matched == 0
    assert rec.after == rec.before  # graph untouched
    assert rec.calls(RMS_NORM) == []
    ((site, why),) = rec.unmatched
    assert why.startswith(reason), why
    assert site.startswith("rsqrt") or site.startswith("pow")
    assert "test_canonicalize.py" in site and "rsqrt" in site  # the model source line


def test_eps_tensor_left_alone():
    class EpsBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("eps", torch.tensor(1e-6))

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    module = EpsBuffer()
    x = input_of((3, 16), torch.bfloat16)
    out, rec = compile_run(module, x)
    torch.testing.assert_close(out, eager(module, x))
    assert rec.matched == 0 and rec.after == rec.before
    ((_, why),) = rec.unmatched
    assert why == "eps is a tensor, not a constant"  # a float32 buffer: no dynamic=True hint


def test_layer_norm_is_not_a_norm_site():
    module = nn.LayerNorm(32)
    x = torch.randn(3, 32)
    _, rec = compile_run(module, x)
    assert rec.matched == 0 and rec.unmatched == [] and rec.after == rec.before


def test_training_forward_keeps_saved_rsqrt():
    # AOTAutograd saves rsqrt for the backward: rewriting the forward would compute the
    # reduction twice, so the site is reported and left alone.
    module = models.LlamaRMSNorm(32, eps=1e-6, dtype=torch.float32)
    module.weight.requires_grad_(True)
    x = torch.randn(3, 32, requires_grad=True)
    torch._dynamo.reset()
    rec = Recorder()
    with torch._inductor.config.patch(post_grad_custom_post_pass=rec, fx_graph_cache=False):
        out = torch.compile(module, fullgraph=True)(x)
        out.sum().backward()
    torch.testing.assert_close(out, module(x))
    assert rec.matched == 0
    assert any(why.startswith("intermediate used elsewhere") for _, why in rec.unmatched)


def test_run_accepts_options_and_reports_counts():
    graph = torch.fx.Graph()  # no norm at all
    graph.output(graph.placeholder("x"))
    result = canonicalize.CanonicalizePass().run(graph, type("Options", (), {"strict": True})())
    assert result.name == canonicalize.CanonicalizePass.name == "canonicalize"
    assert result.matched == 0 and result.unmatched == []


def test_to_copy_casts():
    # Casts as aten._to_copy (make_fx without Inductor's decompositions; plausible in other
    # torch versions) are matched like prims.convert_element_type. The graph runs eagerly here.
    from types import SimpleNamespace

    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x, w):  # LlamaRMSNorm.forward with its attributes as arguments
        return models.LlamaRMSNorm.forward(SimpleNamespace(weight=w, variance_epsilon=1e-6), x)

    x, w = input_of((3, 80), torch.bfloat16), input_of((80,), torch.bfloat16)
    gm = make_fx(fn, tracing_mode="fake")(x, w)
    assert any(n.target is aten._to_copy.default for n in gm.graph.nodes)
    result = canonicalize.CanonicalizePass().run(gm.graph, None)
    gm.recompile()
    assert result.matched == 1 and result.unmatched == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [RMS_NORM]
    assert_equal(gm(x, w), fn(x, w))


@pytest.mark.cuda
@pytest.mark.parametrize("style", list(models.NORMS))
def test_model_norm_cuda(style):
    # The rewritten node runs the op's eager dispatch; with the reference provider forced it
    # equals the model bit for bit (Triton kernels only promise a tolerance).
    from compile_norm.ops import registry
    from compile_norm.ops.norm import rms_norm_ref

    dtype, eps = torch.bfloat16, 1e-6
    module = models.NORMS[style](96, eps=eps, dtype=dtype).cuda()
    x = input_of((2, 5, 96), dtype).cuda()
    with registry.providers_priority(["native"]):
        out, rec = compile_run(module, x)
    (node,) = assert_rewritten(rec, 1, eps)
    if style in ("nn_rmsnorm", "f_rms_norm"):
        # Eager uses a fused CUDA kernel; the graph holds torch's decomposition, whose
        # numerics are the contract's with the weight applied in float32.
        (weight,) = module.parameters()
        ref = rms_norm_ref(x, weight.float(), eps)
    else:
        ref = eager(module, x)
    assert_equal(out, ref)


def _fused_rms_norm_graph(x, w, eps, use_rstd=False):
    """A post-grad-like graph holding aten._fused_rms_norm itself, with fake values."""
    import operator

    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    mode = FakeTensorMode()
    xn, wn = graph.placeholder("x"), graph.placeholder("w")
    xn.meta["val"], wn.meta["val"] = mode.from_tensor(x), mode.from_tensor(w)
    fused = graph.call_function(aten._fused_rms_norm.default, (xn, [x.shape[-1]], wn, eps))
    with mode:
        fused.meta["val"] = fused.target(xn.meta["val"], [x.shape[-1]], wn.meta["val"], eps)
    outs = []
    for i in (0, 1):
        outs.append(graph.call_function(operator.getitem, (fused, i)))
        outs[-1].meta["val"] = fused.meta["val"][i]
    graph.output((outs[0], outs[1]) if use_rstd else (outs[0],))
    return graph


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=IDS.get)
def test_aten_fused_rms_norm(dtype):
    from compile_norm.ops.norm import rms_norm_ref

    x, w = input_of((3, 96), dtype), input_of((96,), torch.bfloat16)
    graph = _fused_rms_norm_graph(x, w, 1e-6)
    result = canonicalize.CanonicalizePass().run(graph, None)
    assert result.matched == 1 and result.unmatched == []
    graph.lint()
    (node,) = [n for n in graph.nodes if n.target is RMS_NORM]
    assert not any(n.target is aten._fused_rms_norm.default for n in graph.nodes)
    assert node.args[1].meta["val"].dtype == torch.float32  # weight promoted, as torch does
    (out,) = torch.fx.GraphModule({}, graph)(x, w)
    assert_equal(out, rms_norm_ref(x, w.float(), 1e-6))
    assert_equal(out, aten._fused_rms_norm.default(x, [96], w, 1e-6)[0])


def test_aten_fused_rms_norm_rstd_used():
    x, w = input_of((3, 96), torch.bfloat16), input_of((96,), torch.bfloat16)
    graph = _fused_rms_norm_graph(x, w, 1e-6, use_rstd=True)
    before = str(graph)
    result = canonicalize.CanonicalizePass().run(graph, None)
    assert result.matched == 0 and str(graph) == before
    ((_, why),) = result.unmatched
    assert why.startswith("intermediate used elsewhere")
