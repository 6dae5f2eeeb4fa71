"""inspect_model against the stand-in backend (tests/test_inspect_standin.py), plus the pieces
that need no compile: graph snapshots and diffs, numerics, kernel parsing."""

import json
import os
import re

import pytest
import torch

from compile_norm.inspect import InspectReport, inspect_model
from compile_norm.inspect import graphs, kernels, numerics
from compile_norm.inspect.record import StageRecorder
from compile_norm.passes.base import PassResult, notify_stage, observe_stages
from test_inspect_standin import backend as standin


class Norm(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(hidden))

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.w * (x * torch.rsqrt(v + 1e-6))  # the site the stand-in fuses


class Model(torch.nn.Module):
    def __init__(self, hidden=24):
        super().__init__()
        self.norm = Norm(hidden)
        self.lin = torch.nn.Linear(hidden, hidden)

    def forward(self, x, r):
        h = x + r
        y = self.norm(h)
        z = torch.rsqrt(y.abs() + 1)  # an rsqrt that is no norm: reported unmatched
        return self.lin(y) + z, h


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("inspect")
    x, r = torch.randn(5, 24), torch.randn(5, 24)
    report = inspect_model(Model(), (x, r), backend=standin, code=True, bench=True,
                           out_dir=str(out), depyf=True, repeats=2, options={"strict": True})
    return report, out


def test_stages_are_recorded_in_order(inspected):
    report, _ = inspected
    assert len(report.graphs) == 1
    g = report.graphs[0]
    assert [s.name for s in g.stages] == ["input", "canonicalize", "lower"]
    assert "forward" in g.label
    assert "aten.rsqrt.default" in g.stages[0].graph.text()
    assert "compile_norm.rms_norm.default(" in g.stages[1].graph.text()
    assert "compile_norm.rms_norm.default(" not in g.stages[0].graph.text()
    assert g.stages[1].matched == 1 and g.stages[0].matched is None


def test_fused_site_has_model_source_line(inspected):
    report, _ = inspected
    (site,) = report.fused
    assert site.stage == "canonicalize"
    assert site.op == "compile_norm.rms_norm.default"
    assert site.source.startswith("test_inspect.py:")
    assert "torch.rsqrt(v + 1e-6)" in site.source
    assert report.fused_counts() == {"compile_norm.rms_norm.default": 1}


def test_diff_names_removed_and_rewired_nodes(inspected):
    report, _ = inspected
    st = report.graphs[0].stages[1]
    before = report.graphs[0].stages[0].graph.by_name()
    removed_targets = {before[n].target for n in st.removed}
    assert {"aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.rsqrt.default"} <= removed_targets
    assert st.added == [site.node for site in st.fused]
    # the weight multiply now reads the new node
    assert any("aten.mul.Tensor" in st.graph.by_name()[n].text for n in st.rewired)
    assert not report.graphs[0].stages[2].changed


def test_unmatched_sites_and_counters(inspected):
    report, _ = inspected
    (u,) = report.unmatched
    assert u.stage == "canonicalize" and u.site.startswith("rsqrt")
    assert "rsqrt(mean" in u.reason
    assert report.counters["canonicalize_matched"] == 1
    assert report.counters["canonicalize_unmatched"] == 1


def test_kernels_with_source(inspected):
    report, _ = inspected
    assert report.kernels, "Inductor generated no kernel?"
    for k in report.kernels:
        assert k.name and k.source and "kernel" in k.source
    assert report.calls.get("torch.ops.compile_norm.rms_norm.default") == 1


def test_numerics_and_bench(inspected):
    report, _ = inspected
    assert [c.name for c in report.numerics] == ["out[0]", "out[1]"]
    assert report.numerics_ok
    assert all(c.max_abs < 1e-4 and c.dtype == "float32" for c in report.numerics)
    b = report.bench
    assert b.backend_us > 0 and b.stock_us > 0 and b.eager_us > 0 and b.repeats == 2
    assert b.speedup == pytest.approx(b.stock_us / b.backend_us)
    for name, median in (("backend", b.backend_us), ("stock", b.stock_us), ("eager", b.eager_us)):
        lo, hi = b.spread[name]
        assert lo <= median <= hi
    assert "parity" in b.expectation and "interleaved" in report.to_text()


def test_renderings_and_files(inspected):
    report, out = inspected
    data = json.loads(report.to_json())
    assert data["graphs"][0]["stages"][1]["fused"][0]["op"] == "compile_norm.rms_norm.default"
    assert data["options"] == {"strict": True} and data["numerics_ok"] is True
    assert "speedup" in data["bench"]
    text = report.to_text(graphs=True)
    assert "fused   rms_norm" in text and "unfused rsqrt" in text and "vs stock" in text
    assert "[kernel " in text
    for name in ("graph0_0_input.txt", "graph0_1_canonicalize.txt", "graph0_2_lower.txt",
                 "report.json", "report.html", "report.txt"):
        assert (out / name).stat().st_size > 0, name
    assert "compile_norm.rms_norm.default" in (out / "graph0_1_canonicalize.txt").read_text()
    dumped = os.listdir(out / "depyf")
    assert any("AFTER_POST_GRAD" in f or "full_code" in f for f in dumped), dumped


def test_without_code_kernels_have_no_source():
    def f(x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).relu() + 1

    report = inspect_model(f, torch.randn(3, 10), backend=standin)
    assert report.title == "f"
    assert report.kernels and all(k.source is None for k in report.kernels)
    assert not report.code_included and report.bench is None
    assert len(report.fused) == 1 and report.numerics_ok


@pytest.mark.cuda
def test_cuda_bf16_triton_kernels_and_synchronized_bench():
    model = Model(hidden=4096 + 64).to("cuda", torch.bfloat16)  # non-power-of-two hidden
    x = torch.randn(2, 33, 4096 + 64, device="cuda", dtype=torch.bfloat16)
    report = inspect_model(model, (x, torch.randn_like(x)), backend=standin, code=True,
                           bench=True, repeats=3)
    assert report.device.startswith("cuda")
    assert report.kernels and all(k.kind == "triton" and "@triton.jit" in k.source
                                  for k in report.kernels)
    assert len(report.fused) == 1 and report.numerics_ok
    assert [c.dtype for c in report.numerics] == ["bfloat16", "bfloat16"]
    assert report.bench.device.startswith("cuda") and report.bench.backend_us > 0


def test_backend_without_stages_is_reported():
    def plain(gm, example_inputs, **kwargs):  # never calls notify_stage
        return gm.forward

    report = inspect_model(lambda x: torch.relu(x) * 2, torch.randn(4), backend=plain)
    assert report.graphs == []
    assert any("notify_stage" in w for w in report.warnings)
    assert report.numerics_ok


def test_wrong_results_fail_the_numerics_check():
    def off_by_a_bit(gm, example_inputs, **kwargs):
        def run(*args):
            return [o + 1e-2 for o in gm(*args)]
        return run

    report = inspect_model(lambda x: (x * 3,), (torch.randn(8),), backend=off_by_a_bit)
    (check,) = report.numerics
    assert not check.ok and not report.numerics_ok
    assert check.max_abs == pytest.approx(1e-2, rel=1e-3)
    assert "FAIL" in report.to_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="no_such_backend"), "not registered"),
        (dict(backend=standin, depyf=True), "needs out_dir"),
        (dict(backend=standin, options=[1]), "options must be a dict"),
        (dict(backend=standin, repeats=0), "repeats"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inspect_model(torch.nn.ReLU(), torch.randn(3), **kwargs)


def test_bad_model_and_inputs():
    with pytest.raises(ValueError, match="model_or_fn"):
        inspect_model(3, torch.randn(3), backend=standin)
    with pytest.raises(ValueError, match="example_inputs"):
        inspect_model(torch.nn.ReLU(), {"x": torch.randn(3)}, backend=standin)


# --- no compile needed ------------------------------------------------------------------------


def _traced_norm_graph():
    def f(x, w):
        v = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(v + 1e-6))

    gm = torch.fx.symbolic_trace(f)
    for n in gm.graph.nodes:
        n.meta["stack_trace"] = (
            '  File "/somewhere/model.py", line 7, in forward\n    return self.inner(x)\n'
            f'  File "/somewhere/norm.py", line 3{len(n.name) % 10}, in _norm\n'
            f"    y = {n.name}(...)\n"
        )
    return gm.graph


def _fuse_by_hand(graph):
    """What a canonicalize pass does: x * rsqrt(...) -> compile_norm.rms_norm(x, None, eps)."""
    (mul,) = [n for n in graph.nodes if n.name == "mul"]
    x = mul.args[0]
    with graph.inserting_before(mul):
        ir = graph.call_function(torch.ops.compile_norm.rms_norm.default, (x, None, 1e-6))
    mul.replace_all_uses_with(ir)
    graph.eliminate_dead_code()
    return ir


def test_recorder_on_a_hand_made_graph():
    graph = _traced_norm_graph()
    rec = StageRecorder()
    with observe_stages(rec):
        notify_stage("input", graph)
        ir = _fuse_by_hand(graph)
        notify_stage("canonicalize", graph, PassResult("canonicalize", matched=1,
                                                       unmatched=[("rsqrt_9", "eps is a tensor")]))
    notify_stage("ignored", graph)  # nothing observes any more
    (g,) = rec.graphs
    assert [s.name for s in g.stages] == ["input", "canonicalize"]
    st = g.stages[1]
    assert [s.node for s in st.fused] == [ir.name]
    # the IR node has no stack trace of its own: it takes the replaced node's
    assert st.fused[0].source == "norm.py:33 in _norm: y = mul(...) (from model.py:7)"
    assert set(st.removed) == {"pow_1", "mean", "add", "rsqrt", "mul"}
    assert st.unmatched[0].reason == "eps is a tensor"
    rows = graphs.aligned_rows(g.stages[0].graph, st.graph)
    kinds = [k for k, _, _ in rows]
    assert "added" in kinds or "changed" in kinds
    assert sum(1 for k, b, a in rows if b is not None) == len(g.stages[0].graph.nodes)
    assert sum(1 for k, b, a in rows if a is not None) == len(st.graph.nodes)


def test_recorder_flags_a_stage_before_input():
    rec = StageRecorder()
    rec("canonicalize", _traced_norm_graph(), PassResult("canonicalize"))
    assert rec.problems and len(rec.graphs) == 1


def test_source_line():
    st = ('  File "/a/b/model.py", line 12, in forward\n    h = self.norm(x)\n'
          '  File "/a/b/norm.py", line 40, in forward\n    return x * torch.rsqrt(v)\n')
    assert graphs.source_line(st) == (
        "norm.py:40 in forward: return x * torch.rsqrt(v) (from model.py:12)")
    one = '  File "/a/norm.py", line 3, in f\n    y = 1\n'
    assert graphs.source_line(one) == "norm.py:3 in f: y = 1"
    assert graphs.source_line(None) is None
    assert graphs.source_line("no frames here") is None


def test_kernel_parsing():
    code = (
        "from torch import empty\n"
        "triton_per_fused_add_mean_0 = async_compile.triton('triton_per_fused_add_mean_0', '''\n"
        "@triton.jit\ndef triton_per_fused_add_mean_0(in_ptr0):\n    pass\n''', device_str='cuda')\n"
        "cpp_fused_mul_1 = async_compile.cpp_pybinding(['float*'], '''\nextern \"C\" void kernel() {}\n''')\n"
        "def call(args):\n    buf0 = extern_kernels.mm(a, b)\n"
        "    buf1 = torch.ops.compile_norm.rms_norm.default(buf0, None, 1e-06)\n"
        "    triton_per_fused_add_mean_0.run(buf1)\n"
    )
    ks, calls = kernels.parse([code], with_source=True)
    assert [(k.name, k.kind) for k in ks] == [
        ("triton_per_fused_add_mean_0", "triton"), ("cpp_fused_mul_1", "cpp_pybinding")]
    assert ks[0].source.startswith("@triton.jit") and "kernel()" in ks[1].source
    assert calls == {"extern_kernels.mm": 1, "torch.ops.compile_norm.rms_norm.default": 1}
    ks, _ = kernels.parse([code], with_source=False)
    assert all(k.source is None for k in ks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_numerics_tolerance_per_dtype(dtype):
    atol, rtol = numerics.DEFAULT_TOLERANCES[dtype]
    e = torch.randn(7, 33).to(dtype)
    inside = (e.double() + atol * 0.5).to(dtype)
    (c,) = numerics.compare(e.clone(), e)
    assert c.ok and c.max_abs == 0
    outside = e.clone()
    outside[3, 5] = e[3, 5].double() + 10 * (atol + rtol * abs(float(e[3, 5]))) + 1
    (c,) = numerics.compare(outside, e)
    assert not c.ok and c.max_abs > atol
    (c,) = numerics.compare(inside, e)
    assert c.ok == bool(((inside.double() - e.double()).abs()
                         <= atol + rtol * e.double().abs()).all())


def test_numerics_structure_nan_and_mismatch():
    e = {"a": torch.randn(4), "b": (torch.randn(2, 3).t(), 5)}
    c = {"a": e["a"].clone(), "b": (e["b"][0].clone(), 5)}
    checks = numerics.compare(c, e)
    assert [x.name for x in checks] == ["out['a']", "out['b'][0]", "out['b'][1]"]
    assert all(x.ok for x in checks)
    nan_e = torch.tensor([1.0, float("nan")])
    (x,) = numerics.compare(torch.tensor([1.0, 2.0]), nan_e)
    assert not x.ok and "NaN" in x.note
    (x,) = numerics.compare(torch.randn(3), torch.randn(4))
    assert not x.ok and "compiled gave" in x.note
    (x,) = numerics.compare(torch.zeros(0, 8), torch.zeros(0, 8))
    assert x.ok
    ints = torch.randint(-100, 100, (5,), dtype=torch.int64)
    (x,) = numerics.compare(ints + 1, ints)
    assert not x.ok
    assert not numerics.compare((torch.randn(2),), (torch.randn(2), torch.randn(2)))[0].ok


def test_report_with_nothing_renders():
    r = InspectReport("empty", "compile_norm", {}, "cpu", torch.__version__)
    assert "fused: nothing" in r.to_text()
    assert json.loads(r.to_json())["graphs"] == []
    assert "<html" in r.to_html()


class ResidualBlock(torch.nn.Module):
    """Two norms, each behind a residual add: canonicalized, then fused with the add."""

    def __init__(self, hidden=40):
        super().__init__()
        self.n1, self.n2 = Norm(hidden), Norm(hidden)
        self.lin = torch.nn.Linear(hidden, hidden)

    def forward(self, x, r):
        h = x + r
        return self.n2(self.lin(self.n1(h)) + h)


def test_real_backend_counts_each_site_once(tmp_path):
    x, r = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    report = inspect_model(ResidualBlock(), (x, r), out_dir=str(tmp_path))
    assert report.numerics_ok
    assert [s.op for s in report.fused] == ["compile_norm.fused_add_rms_norm.default"] * 2
    assert report.rewrites() == {"canonicalize": 2, "residual": 2}
    text = report.to_text()
    assert "fused sites: 2 (rewrites per stage: canonicalize 2, residual 2)" in text
    assert "fused: compile_norm.fused_add_rms_norm.default x2" in text
    html = (tmp_path / "report.html").read_text()
    assert '<div class="k">fused sites</div><div class="v">2</div>' in html
    tags = {stage: [] for stage in ("canonicalize", "residual", "lower")}
    for tag, stage in re.findall(r'<span class="tag (\w+)">\w+</span></td><td>(\w+)</td>', html):
        tags[stage].append(tag)
    # canonicalize's rms_norm nodes are steps the residual pass absorbed; its fused_add nodes
    # are the sites, and the lower pass lowers them
    assert sorted(tags["canonicalize"]) == ["rewritten"] * 2
    assert sorted(tags["residual"]) == ["absorbed"] * 2 + ["fused"] * 2
    assert sorted(tags["lower"]) == ["lowered"] * 2


def test_print_gives_the_text_report(inspected):
    report, _ = inspected
    assert str(report) == report.to_text()
    assert repr(report) == "<InspectReport 'Model': 1 fused site(s), 1 unfused, %d kernel(s), numerics ok>" % len(report.kernels)


def test_bench_interleaves_candidates_and_rotates_the_first():
    from compile_norm.inspect import bench

    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = bench.interleaved_us(fns, "cpu", repeats=3, inner=2, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert "".join(order[3:]) == "aabbcc" + "bbccaa" + "ccaabb"  # after one warm-up call each
    assert bench.median_and_spread([5.0, 1.0, 3.0, 100.0, 2.0]) == (3.0, (2.0, 5.0))
    assert bench.median_and_spread([4.0]) == (4.0, (4.0, 4.0))
