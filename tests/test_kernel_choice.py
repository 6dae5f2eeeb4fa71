"""Kernel choice (lowerings/choice.py) and the lower pass's Triton-kernel lowering, on CPU.

The kernels cannot run here: graphs are traced with fake CUDA tensors and only their
structure is checked (what the lower pass would hand to Inductor)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import compile_norm  # noqa: F401
from compile_norm.kernels import library_ops, triton_ops

try:
    from compile_norm.kernels import triton_kernel as K
except ImportError:  # no triton
    K = None
from compile_norm.lowerings import choice
from compile_norm.ops import registry
from compile_norm.options import parse_options
from compile_norm.passes import lower

cn = torch.ops.compile_norm
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def empty_measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILE_NORM_CHOICE_CACHE", str(tmp_path / "choice.json"))
    choice.reset_measured()
    yield
    choice.reset_measured()


@pytest.fixture(autouse=True)
def inductor_keeps_batch_invariance(monkeypatch):
    """The table's semantics as on a torch whose Inductor has the batch_invariant setting
    (2.12+); on 2.11 the kernel is chosen unmeasured (tested on its own below)."""
    monkeypatch.setattr(choice, "inductor_has", lambda name: True)


def fake_cuda(*shapes, dtype=BF16):
    mode = FakeTensorMode()
    with mode:
        return mode, [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]


def group_args(t, h, dtype=BF16):
    _, (x, w) = fake_cuda((t, h), (h,), dtype=dtype)
    return [x, w, 1e-6, 128]


def test_cpu_is_always_generated():
    x, w = torch.randn(8192, 4096, dtype=BF16), torch.randn(4096, dtype=BF16)
    for op in ("rms_norm_fp8_group", "rms_norm_fp8_static", "rms_norm"):
        assert choice.choose(op, [x, w, 1e-6]) == "generated"
    assert "cpu" in choice.explain("rms_norm_fp8_group", [x, w, 1e-6])[1]


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_table_on_fake_cuda():
    assert choice.choose("rms_norm_fp8_group", group_args(8192, 4096)) == "kernel"
    assert choice.choose("rms_norm_fp8_group", group_args(1, 4096)) == "kernel"
    # non-power-of-two hidden: the split-tile kernel wins for group FP8 ...
    assert choice.choose("rms_norm_fp8_group", group_args(8192, 5376)) == "kernel"
    # ... and for add + norm + dynamic FP8 there (0.98 vs 0.93 of copy)
    _, (x5, r5, w5) = fake_cuda((8192, 5376), (8192, 5376), (5376,))
    assert choice.choose("fused_add_rms_norm_fp8_dynamic", [x5, r5, w5, 1e-6, None, 0.0, None]) == "kernel"
    # QK-norm rows (hidden 128) are not in the table
    assert choice.choose("rms_norm_fp8_group", group_args(32768, 128)) == "generated"
    # fp32 activations are not in the table
    assert choice.choose("rms_norm_fp8_group", group_args(8192, 4096, torch.float32)) == "generated"
    _, (x, w, r) = fake_cuda((2048, 4096), (4096,), (2048, 4096))
    assert choice.choose("rms_norm", [x, w, 1e-6, 0.0, None]) == "generated"  # ties
    assert choice.choose("fused_add_rms_norm_fp8_dynamic", [x, r, w, 1e-6, None, 0.0, None]) == "kernel"
    _, (x1, w1) = fake_cuda((1, 4096), (4096,))
    # batch invariant (the default): one choice for every token count, the bulk one
    assert choice.choose("rms_norm_int8_dynamic", [x1, w1, 1e-6, 0.0, None]) == "kernel"
    assert choice.choose("rms_norm_int8_dynamic", [x1, w1, 1e-6, 0.0, None], batch_invariant=False) == "generated"
    assert choice.choose("rms_norm_int8_dynamic", [x, w, 1e-6, 0.0, None]) == "kernel"
    # group size the kernel does not take (not a power of two): generated
    bad = group_args(8192, 4096)
    bad[3] = 96
    assert choice.choose("rms_norm_fp8_group", bad) == "generated"
    with pytest.raises(ValueError, match="op_name"):
        choice.choose("layer_norm", bad)


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_measurements_override_the_table_and_persist():
    args = group_args(8192, 4096)
    key = choice.shape_class("rms_norm_fp8_group", args)
    device = choice.device_key(args[0].device)
    key_before = choice.state_key()
    # geometric mean of kernel / generated over the tokens measured: sqrt(1.25 * 0.9) > 0.97
    assert choice.record(key, device, (16, 8192), generated_us=(4.0, 40.0), kernel_us=(5.0, 36.0)) == "generated"
    assert choice.choose("rms_norm_fp8_group", args) == "generated"
    assert choice.choose("rms_norm_fp8_group", group_args(1, 4096)) == "generated"  # same class: any T
    assert choice.state_key() != key_before
    choice.reset_measured()  # a new process: read back from disk
    assert choice.explain("rms_norm_fp8_group", args)[1].startswith("measured")
    # another hidden size, or another device, still follows the table
    assert choice.choose("rms_norm_fp8_group", group_args(2048, 5376)) == "kernel"
    assert choice.measured(key, "another card|torch 0|triton 0") is None
    # per token class without batch invariance: the class key differs
    assert choice.shape_class("rms_norm_fp8_group", args, batch_invariant=False) != key
    assert choice.choose("rms_norm_fp8_group", args, batch_invariant=False) == "kernel"


def test_shape_class_names_what_changes_speed():
    _, (x, w, r) = fake_cuda((4, 8, 4096), (4096,), (4, 8, 4096))
    key = choice.shape_class("fused_add_rms_norm", [x, r, w, 1e-6, 0.0, None])
    assert key == "fused_add_rms_norm|bfloat16|4096|any|bfloat16,bfloat16[4096],float,float,None"
    assert choice.shape_class("fused_add_rms_norm", [x, r, w, 1e-5, 1.0, None]) == key  # values of floats
    assert choice.shape_class("fused_add_rms_norm", [x, r, w, 1e-6, 0.0, None], batch_invariant=False).split("|")[3] == "decode"  # 32 rows


def test_auto_option_and_uuid_follow_measurements():
    from compile_norm.passes.manager import CompileNormPass

    assert parse_options({"lowering": "auto"}).lowering == "auto"
    with pytest.raises(ValueError, match="lowering"):
        parse_options({"lowering": "fastest"})
    p = CompileNormPass({"lowering": "auto"})
    before = p.uuid()
    choice.record("rms_norm|bfloat16|4096|any|", "card", (8192,), generated_us=(1.0,), kernel_us=(2.0,))
    assert p.uuid() != before
    g = CompileNormPass({"lowering": "generated"})
    assert g.uuid() == g.uuid()


@pytest.fixture
def triton_as_if_on_gpu(cuda_target_for_triton_frontend):
    """The triton provider registered as supported (it is unsupported without a GPU), and
    Triton's own mutation analysis run as on the GPU (it needs only a target)."""
    saved = {op: registry.providers(op).get("triton") for op in registry.ops()}
    for op, (fn, supports) in triton_ops.FUNCTIONS.items():
        registry.register_provider(op, registry.Provider(name="triton", fn=fn, supported=True, supports=supports, rank=10))
    yield
    for op, prov in saved.items():
        if prov is not None:
            registry.register_provider(op, prov)


def traced_graph(fn, *shapes):
    mode, fakes = fake_cuda(*shapes)
    with mode:
        return make_fx(fn)(*fakes).graph


def kernel_nodes(graph):
    hop = torch.ops.higher_order.triton_kernel_wrapper_functional
    return [n for n in graph.nodes if n.target is hop]


def cn_nodes(graph):
    return [n for n in graph.nodes if getattr(n.target, "namespace", "") == "compile_norm"]


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
@pytest.mark.parametrize("mode", ["kernel", "auto"])
def test_lower_pass_puts_in_the_triton_kernel(triton_as_if_on_gpu, mode):
    def f(x, w):
        q, s = cn.rms_norm_fp8_group(x, w, 1e-6, 128)
        return q, s

    graph = traced_graph(f, (8192, 4096), (4096,))
    result = lower.LowerPass().run(graph, parse_options({"lowering": mode}))
    graph.lint()
    assert result.matched == 1 and not cn_nodes(graph)
    (k,) = kernel_nodes(graph)
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(k.kwargs["kernel_idx"])  # an Autotuner holding num_warps
    assert getattr(kernel, "fn", kernel) is library_ops.K.norm_quant_kernel
    # only the freshly allocated outputs are written (cloned, later re-inplaced by Inductor)
    assert sorted(k.kwargs["tensors_to_clone"]) == ["q_ptr", "s_ptr"]
    assert not [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
    out = [n for n in graph.nodes if n.op == "output"][0]
    q, s = out.args[0]
    assert q.meta["val"].dtype == torch.float8_e4m3fn and tuple(q.meta["val"].shape) == (8192, 4096)
    assert tuple(s.meta["val"].shape) == (8192, 32)


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
@pytest.mark.parametrize("op, kwargs, written, gate", [
    ("rms_norm_gated", {}, ["out_ptr"], 1),
    ("rms_norm_gated_fp8_dynamic", {"norm_before_gate": False, "norm_group_size": 1024},
     ["q_ptr", "s_ptr"], 2),
])
def test_lower_pass_puts_in_the_gated_kernel(triton_as_if_on_gpu, op, kwargs, written, gate):
    def f(x, g, w):
        return getattr(cn, op)(x, g, w, 1e-6, **kwargs)

    graph = traced_graph(f, (8192, 4096), (8192, 4096), (4096,))
    result = lower.LowerPass().run(graph, parse_options({"lowering": "kernel"}))
    graph.lint()
    assert result.matched == 1 and not cn_nodes(graph)
    (k,) = kernel_nodes(graph)
    assert sorted(k.kwargs["tensors_to_clone"]) == written
    launch = k.kwargs["kwargs"]
    assert (launch["GATE"], launch["NORM_GROUPED"]) == (gate, gate == 2)
    assert launch["V"] == (1024 if gate == 2 else 4096)  # the norm's columns


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_auto_keeps_generated_code_where_the_table_says(triton_as_if_on_gpu):
    def f(x, r, w):
        return cn.fused_add_rms_norm(x, r, w, 1e-6)

    graph = traced_graph(f, (2048, 4096), (2048, 4096), (4096,))
    result = lower.LowerPass().run(graph, parse_options({"lowering": "auto"}))
    assert result.matched == 1 and not cn_nodes(graph) and not kernel_nodes(graph)
    graph = traced_graph(f, (2048, 4096), (2048, 4096), (4096,))
    lower.LowerPass().run(graph, parse_options({"lowering": "kernel"}))
    (k,) = kernel_nodes(graph)
    assert sorted(k.kwargs["tensors_to_clone"]) == ["out_ptr", "res_out_ptr"]


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_library_ops_have_the_ops_schemas():
    ops = library_ops.register()
    # every forward op the kernel implements in one launch or, per-tensor FP8, two; the
    # backward (optional dweight) is traced from library_ops.functions() by the lower pass,
    # not declared (tests/test_backward_lowering.py)
    from compile_norm.kernels import two_pass

    assert set(ops) == {s.name for s in triton_ops.kernel_specs()} | set(two_pass.PASSES)
    assert "rms_norm_backward" in library_ops.functions() and "rms_norm_fp8_group" in ops
    for name, overload in ops.items():
        ours = getattr(cn, name).default._schema
        theirs = overload._schema
        assert theirs.name == f"compile_norm_kernels::{name}"
        assert [a.name for a in theirs.arguments] == [a.name for a in ours.arguments]
        assert [str(a.type).replace("SymInt", "int") for a in theirs.arguments] == \
            [str(a.type).replace("SymInt", "int") for a in ours.arguments]
        assert len(theirs.returns) == len(ours.returns)


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_library_op_fake_shapes_match_the_op():
    mode, (x, r, w) = fake_cuda((3, 5, 4096), (3, 5, 4096), (4096,))
    ops = library_ops.register()
    with mode:
        got = ops["fused_add_rms_norm_int8_dynamic_asym"](x, r, w, 1e-6)
        want = cn.fused_add_rms_norm_int8_dynamic_asym(x, r, w, 1e-6)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        got = ops["rms_norm_fp8_group"](x, w, 1e-6, 128, True, True)
        want = cn.rms_norm_fp8_group(x, w, 1e-6, 128, True, True)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()


@pytest.mark.cuda
def test_library_ops_run_and_match_the_provider():
    torch.manual_seed(0)
    ops = library_ops.register()
    x = torch.randn(67, 5376, device="cuda", dtype=BF16)
    r, w = torch.randn_like(x), torch.randn(5376, device="cuda", dtype=BF16)
    for a, b in zip(ops["fused_add_rms_norm_fp8_group"](x, r, w, 1e-6, 128),
                    triton_ops.FUNCTIONS["fused_add_rms_norm_fp8_group"][0](x, r, w, 1e-6, 128)):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@pytest.mark.cuda
def test_triton_mutation_analysis_agrees_with_written_args():
    """On the GPU Triton's own analysis runs: it must find exactly the kernel's outputs."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    mode, fakes = fake_cuda((256, 4096), (256, 4096), (4096,))
    for name, args in (("fused_add_rms_norm", lambda x, r, w: [x, r, w, 1e-6, 0.0, None]),
                       ("rms_norm_int8_dynamic_asym", lambda x, r, w: [x, w, 1e-6, 0.0, None])):
        with mode:
            gm = library_ops.functional_trace(library_ops.functions()[name], args(*fakes))
        (k,) = kernel_nodes(gm.graph)
        consts = tkw.kernel_side_table.get_constant_args(k.kwargs["constant_args_idx"])
        assert sorted(k.kwargs["tensors_to_clone"]) == sorted(library_ops.written_args({**k.kwargs["kwargs"], **consts}))


@pytest.mark.cuda
@pytest.mark.parametrize("lowering", ["kernel", "auto"])
def test_compiled_kernel_lowering_is_a_user_defined_kernel(lowering):
    from compile_helpers import compile_run

    def f(x, w):
        return cn.rms_norm_fp8_group(x, w, 1e-6, 128)

    x = torch.randn(4096, 4096, device="cuda", dtype=BF16)
    w = torch.randn(4096, device="cuda", dtype=BF16)
    c = compile_run(f, x, w, options={"lowering": lowering, "passes": [], "strict": True})
    assert c.counts["lower_triton_kernel"] == 1
    # (comments in the code name the original op: look for calls of it)
    assert "norm_quant_kernel" in c.code and "torch.ops.compile_norm." not in c.code
    want = triton_ops.FUNCTIONS["rms_norm_fp8_group"][0](x, w, 1e-6, 128)
    assert torch.equal(c.out[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(c.out[1], want[1])


@pytest.mark.cuda
@pytest.mark.parametrize("form", [{}, {"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True}],
                         ids=["divide", "torchao_tensorwise"])
def test_compiled_per_tensor_fp8_is_the_two_eager_launches(form):
    """Per-tensor dynamic FP8 lowers to its eager provider's two kernel launches (not the
    reference's generated code, which ran 0.84x stock in run 18): the eager bits."""
    from compile_helpers import compile_run

    def f(x, r, w):
        return cn.fused_add_rms_norm_fp8_dynamic_tensor(x, r, w, 1e-6, **form)

    x = torch.randn(3000, 5376, device="cuda", dtype=BF16)
    r, w = torch.randn_like(x), torch.randn(5376, device="cuda", dtype=BF16)
    c = compile_run(f, x, r, w, options={"lowering": "kernel", "passes": [], "strict": True})
    assert c.counts["lower_triton_kernel"] == 1
    assert "norm_quant_kernel" in c.code and "torch.ops.compile_norm." not in c.code
    for got, want in zip(c.out, f(x, r, w)):  # q, the 0-dim scale, residual_out
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.cuda
def test_compiled_kernel_lowering_computes_what_the_eager_kernel_does():
    """Inductor passes eps / weight_offset as fp64 to a user-defined kernel (eager Triton: fp32);
    the kernel converts them, so rstd and (w + offset) stay fp32: bit-identical to eager."""
    from compile_helpers import compile_run

    def f(x, r, w, s):
        return cn.fused_add_rms_norm_fp8_static(x, r, w, 1e-5, s, weight_offset=1.0)

    x = torch.randn(1000, 5376, device="cuda", dtype=BF16)
    r = torch.randn_like(x)
    w = 0.1 * torch.randn(5376, device="cuda", dtype=BF16)
    s = torch.tensor(0.02, device="cuda")
    c = compile_run(f, x, r, w, s, options={"lowering": "kernel", "passes": [], "strict": True})
    assert c.counts["lower_triton_kernel"] == 1
    assert "'eps': 'fp64'" in c.code  # what makes the conversion necessary (Inductor's typing)
    want = f(x, r, w, s)  # eager: the Triton provider
    assert torch.equal(c.out[0].view(torch.uint8), want[0].view(torch.uint8))  # q
    assert torch.equal(c.out[1], want[1])  # residual_out


def test_imports_and_chooses_generated_without_triton():
    """library_ops and choice import without triton; the choice then is always generated."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        import compile_norm
        from compile_norm.kernels import library_ops
        from compile_norm.lowerings import choice
        assert not library_ops.AVAILABLE and "triton" in library_ops.REASON, library_ops.REASON
        with FakeTensorMode():
            x = torch.empty(8192, 4096, dtype=torch.bfloat16, device="cuda")
            w = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
        c, why = choice.explain("rms_norm_fp8_group", [x, w, 1e-6, 128])
        assert c == "generated" and "triton" in why, why
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_auto_on_cpu_compiles_generated_code():
    from compile_helpers import assert_close, assert_close_q, compile_run

    def f(x, r, w):
        return cn.fused_add_rms_norm_fp8_dynamic(x, r, w, 1e-6)

    x = torch.randn(3, 5, 1024, dtype=BF16)
    r, w = torch.randn_like(x), torch.randn(1024, dtype=BF16)
    c = compile_run(f, x, r, w, options={"lowering": "auto", "passes": [], "strict": True})
    assert c.counts["lower_matched"] == 1 and not c.counts.get("lower_triton_kernel")
    assert "compile_norm" not in c.code
    ref = f(x, r, w)
    assert_close(c.out[2], ref[2], BF16)  # residual_out
    assert_close_q(c.out[0], ref[0], c.out[1])


def test_tune_needs_cuda_tensors():
    from compile_norm.lowerings import measure

    x, w = torch.randn(4, 256), torch.randn(256)
    with pytest.raises(ValueError, match="CUDA"):
        measure.tune("rms_norm", x, w, 1e-6)


@pytest.mark.cuda
def test_tune_measures_once_and_auto_follows_it():
    from compile_norm.lowerings import measure

    x = torch.randn(2048, 4096, device="cuda", dtype=BF16)
    w = torch.randn(4096, device="cuda", dtype=BF16)
    args = [x, w, 1e-6, 128]
    picked = measure.tune("rms_norm_fp8_group", *args)
    entry = choice.measured(choice.shape_class("rms_norm_fp8_group", args), choice.device_key())
    assert entry["choice"] == picked and entry["tokens"] == list(choice.MEASURE_TOKENS["any"])
    assert min(entry["generated_us"]) > 0 and min(entry["kernel_us"]) > 0
    assert choice.explain("rms_norm_fp8_group", args)[1].startswith("measured")
    choice.reset_measured()  # a fresh process reads it back and does not measure again
    assert measure.tune("rms_norm_fp8_group", *args) == picked


@pytest.mark.cuda
def test_compile_measures_a_missing_class_once(monkeypatch):
    """lowering='auto' with measure (the default) times the candidates of a class it has no
    record of, inside the compile, once; the next compile of the class reads the record."""
    from torch._dynamo.utils import counters

    def f(x, w):
        return cn.rms_norm_fp8_group(x, w, 1e-6, 128)

    monkeypatch.setenv("COMPILE_NORM_MEASURE_BUDGET_S", "60")  # tests run with 0 (conftest)
    x = torch.randn(64, 3072, device="cuda", dtype=BF16)
    w = torch.randn(3072, device="cuda", dtype=BF16)
    counters.clear()
    torch._dynamo.reset()
    out = torch.compile(f, backend="compile_norm", options={"passes": []})(x, w)
    assert counters["compile_norm"]["choice_measured"] == 1
    key = choice.shape_class("rms_norm_fp8_group", [x, w, 1e-6, 128])
    entry = choice.measured(key, choice.device_key())
    assert entry is not None and triton_ops.config_from_json(entry["config"]) in triton_ops.few_configs(3072, 128, True)
    ref = f(x, w)
    assert torch.equal(out[1], ref[1])
    counters.clear()
    torch._dynamo.reset()
    torch.compile(f, backend="compile_norm", options={"passes": []})(x[:5], w)  # another T: same class
    assert not counters["compile_norm"]["choice_measured"]


@pytest.fixture
def cuda_target_for_triton_frontend():
    """Triton's front end (source -> TTIR) needs only a target, not a GPU: give it an H100's."""
    if not library_ops.AVAILABLE:
        pytest.skip("triton not importable")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class TargetOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(TargetOnly())
    yield
    driver._active = None


@pytest.mark.parametrize("op,spec", [
    ("rms_norm_fp8_group", ("fp8_group", 128)),
    ("fused_add_rms_norm_fp8_dynamic", ("fp8_dynamic",)),
    ("rms_norm_int8_dynamic_asym", ("int8_dynamic_asym",)),
    ("rms_norm_int8_dynamic", ("int8_dynamic",)),  # its codes packed by inline PTX
    ("fused_add_rms_norm", None),
    ("rms_norm_gated_fp8_dynamic", ("fp8_dynamic",)),  # (the second input is the gate)
    ("rms_norm_gated", ("gate before, groups of 256", False, 256)),
    ("rms_norm_gated", ("gate after",)),  # the gate read with x (EARLY_LOADS)
    ("rms_norm_fp8_static", ("fp8_static", torch.tensor([0.02]))),
])
@pytest.mark.parametrize("tokens", [8, 1])  # (Triton specializes an int equal to 1 as a constant)
def test_inductor_mutation_analysis_of_the_kernel(cuda_target_for_triton_frontend, op, spec, tokens):
    """Inductor's own analysis of which pointers the kernel stores to (it hands scalars in as
    Python floats; an exception there makes Inductor clone every input) finds exactly the
    kernel's outputs, for the launch arguments library_ops builds."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    x, r = torch.randn(tokens, 5376, dtype=BF16), torch.randn(tokens, 5376, dtype=BF16)
    w = torch.randn(5376, dtype=BF16)
    op_spec = registry.spec(op)
    qargs = spec[1:] if spec is not None else ()
    head = (x, r, w) if op_spec.residual or op_spec.gated else (x, w)
    launch = triton_ops.prepare(op_spec, op_spec.bind((*head, 1e-6, *qargs), {}))
    names = library_ops._arg_names()
    kwargs = dict(zip(names, launch.args + launch.consts))
    if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
        access = tkw.identify_accessed_tensors(K.norm_quant_kernel, kwargs, {})
        written = sorted(dep.name for dep in access.read_writes.writes)
    else:
        written = sorted(tkw.identify_mutated_tensors(K.norm_quant_kernel, kwargs, {}))
    assert written == sorted(library_ops.written_args(kwargs))


def test_batch_invariance_without_inductors_setting_takes_the_kernel(monkeypatch):
    """A torch whose Inductor cannot keep generated reductions batch-invariant (2.11): the
    kernel is chosen wherever it takes the call; per-token choices stay available."""
    monkeypatch.setattr(choice, "inductor_has", lambda name: name != "batch_invariant")
    _, (x, w) = fake_cuda((2048, 4096), (4096,))
    c, why = choice.explain("rms_norm", [x, w, 1e-6, 0.0, None])
    assert c == "kernel" and "batch invariance" in why
    assert choice.choose("rms_norm", [x, w, 1e-6, 0.0, None], batch_invariant=False) == "generated"


def test_forced_kernel_measures_only_where_a_launch_config_can_be_picked(monkeypatch):
    """Where batch invariance forces the kernel (torch 2.11), a compile-time measurement can
    only pick the kernel's launch config: one-launch ops are measured, the two-pass per-tensor
    op (a single config) is not, and costs no compile time."""
    from compile_norm.lowerings import measure

    monkeypatch.setattr(choice, "inductor_has", lambda name: name != "batch_invariant")
    measured = []
    monkeypatch.setattr(measure, "measure_class", lambda op, args, key, device: measured.append(op))
    if not library_ops.AVAILABLE:
        pytest.skip(library_ops.REASON)
    x, w = group_args(2048, 4096)[:2]
    assert choice.explain("rms_norm_fp8_dynamic_tensor", [x, w, 1e-6], measure=True)[0] == "kernel"
    assert measured == []
    assert choice.explain("rms_norm_fp8_group", [x, w, 1e-6, 128], measure=True)[0] == "kernel"
    assert measured == ["rms_norm_fp8_group"]
    monkeypatch.setattr(choice, "inductor_has", lambda name: True)  # the choice itself: measured
    choice.explain("rms_norm_fp8_dynamic_tensor", [x, w, 1e-6], measure=True)
    assert measured == ["rms_norm_fp8_group", "rms_norm_fp8_dynamic_tensor"]


def test_mid_token_counts():
    """Without batch invariance, (256, 4096] tokens: the plain norms take the kernel at
    non-power-of-two H (run 9), the quantizing families follow their bulk entries,
    power-of-two plain norms stay generated. With it (the default) the bulk entry holds."""
    _, (x, r, w) = fake_cuda((2048, 2304), (2048, 2304), (2304,))
    assert choice.token_class(2048) == "mid" and choice.token_class(8192) == "bulk"
    per_t = dict(batch_invariant=False)
    assert choice.choose("rms_norm", [x, w, 1e-6, 1.0, None], **per_t) == "kernel"
    assert choice.choose("rms_norm", [x, w, 1e-6, 1.0, None]) == "generated"
    assert choice.choose("fused_add_rms_norm", [x, r, w, 1e-6, 0.0, None], **per_t) == "kernel"
    assert choice.choose("rms_norm_int8_dynamic", [x, w, 1e-6, 0.0, None], **per_t) == "kernel"
    _, (x4, w4) = fake_cuda((2048, 4096), (4096,))
    assert choice.choose("rms_norm", [x4, w4, 1e-6, 0.0, None], **per_t) == "generated"
    _, (x8, w8) = fake_cuda((8192, 2304), (2304,))
    assert choice.choose("rms_norm", [x8, w8, 1e-6, 0.0, None], **per_t) == "generated"


def test_measured_launch_config_is_recorded_and_used_for_the_compiled_kernel(monkeypatch):
    """A measurement tries the default config and its persistent variants, which keep its
    rows per program, tiles and warps (its bits); the lower pass traces the kernel with the
    fastest (launch_config_used), eager launches keep the default."""
    for h, g in ((4096, 0), (5376, 0), (4096, 128), (128, 0)):
        default = triton_ops.launch_config(h, g)
        cands = triton_ops.few_configs(h, g)  # the default, persistent twice, the late schedule
        assert cands[0] == default and [c.programs_per_sm for c in cands] == [0, 2, 4, 0]
        assert [c.early_loads for c in cands] == [None, None, None, False]
        assert all(c._replace(programs_per_sm=0, early_loads=None) == default for c in cands)
        assert {c._replace(early_loads=None) for c in cands} <= set(triton_ops.candidate_configs(h, g))
        assert [triton_ops._early_loads(c) for c in cands] == [True, False, False, False]
    args = group_args(8192, 4096)
    fast = triton_ops.few_configs(4096, 128, True)[1]
    key = choice.shape_class("rms_norm_fp8_group", args)
    choice.record(key, choice.device_key(args[0].device), (16, 8192), (5.0, 50.0), (4.0, 40.0),
                  config=triton_ops.config_to_json(fast))
    assert choice.kernel_config("rms_norm_fp8_group", args) == fast
    assert choice.kernel_config("rms_norm_fp8_group", group_args(8192, 5376)) is None
    x, w = torch.randn(1000, 4096, dtype=BF16), torch.randn(4096, dtype=BF16)
    spec = registry.spec("rms_norm_fp8_group")
    call = spec.bind((x, w, 1e-6, 128), {})
    monkeypatch.setattr(triton_ops, "_sm_count", lambda index: 132)  # an H200's SMs, on this CPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch = triton_ops.prepare(spec, call)
    assert launch.grid0 == 1000 and not launch.const_kwargs()["PERSISTENT"]
    with triton_ops.launch_config_used(fast):
        launch = triton_ops.prepare(spec, call)
    assert launch.grid0 == 2 * 132 and launch.const_kwargs()["PERSISTENT"]
    assert launch.num_warps == fast.num_warps
    late = triton_ops.few_configs(4096, 128, True)[3]
    assert triton_ops.prepare(spec, call).const_kwargs()["EARLY_LOADS"] and late.early_loads is False
    with triton_ops.launch_config_used(late):
        assert not triton_ops.prepare(spec, call).const_kwargs()["EARLY_LOADS"]
    for cfg in triton_ops.few_configs(4096, 128, True):
        assert triton_ops.config_from_json(triton_ops.config_to_json(cfg)) == cfg
    # a config recorded before the schedule was a choice: the default schedule
    assert triton_ops.config_from_json([1, [[32, 128], [0, 1], [0, 1]], 8, 2]).early_loads is None


@pytest.mark.cuda
def test_compiled_kernel_with_a_persistent_config_gives_the_eager_bits(monkeypatch):
    """A recorded persistent config is the one the compiled kernel launches with (fewer
    programs than row blocks), and its outputs are eager's (the default config's) bit for bit."""
    grids = []
    real_grid = triton_ops._grid
    monkeypatch.setattr(triton_ops, "_grid", lambda tokens, cfg, dev: grids.append(cfg) or real_grid(tokens, cfg, dev))
    x = torch.randn(8192, 4096, device="cuda", dtype=BF16)
    w = torch.randn(4096, device="cuda", dtype=BF16)
    args = [x, w, 1e-6, 128]
    persistent = triton_ops.few_configs(4096, 128, True)[2]
    choice.record(choice.shape_class("rms_norm_fp8_group", args), choice.device_key(), (16, 8192),
                  (50.0, 500.0), (4.0, 40.0), config=triton_ops.config_to_json(persistent))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: cn.rms_norm_fp8_group(x, w, 1e-6, 128), backend="compile_norm",
                             options={"passes": [], "measure": False})
    got = compiled(x, w)
    assert persistent in grids, grids
    want = cn.rms_norm_fp8_group(x, w, 1e-6, 128)
    for g, e in zip(got, want):
        assert torch.equal(g.view(torch.uint8), e.view(torch.uint8))


def fake_cuda_tokens(tokens, hidden, dtype=BF16):
    """(mode, x [T, hidden], r, w): fake CUDA tensors whose token count T is symbolic, as in
    a dynamic-shape graph (hint ``tokens``)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    t = env.create_symintnode(env.create_symbol(tokens, ConstantSource("tokens")), hint=tokens)
    with mode:
        x, r = (torch.empty(t, hidden, dtype=dtype, device="cuda") for _ in range(2))
        w = torch.empty(hidden, dtype=dtype, device="cuda")
    return mode, x, r, w


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
def test_symbolic_token_count_takes_the_shape_class_choice():
    """A dynamic-shape graph serves every token count: under batch invariance its choice is
    the shape class's, the same as for any static count; without it, generated code."""
    _, x, r, w = fake_cuda_tokens(64, 4096)
    assert not isinstance(x.shape[0], int)
    _, (xs, rs, ws) = fake_cuda((8192, 4096), (8192, 4096), (4096,))
    for op, tail in (("rms_norm_fp8_group", [1e-6, 128]),
                     ("rms_norm_int8_dynamic", [1e-6, 0.0, None]), ("rms_norm", [1e-6, 0.0, None])):
        assert choice.choose(op, [x, w, *tail]) == choice.choose(op, [xs, ws, *tail]), op
        assert choice.choose(op, [x, w, *tail], batch_invariant=False) == "generated"
    assert choice.choose("fused_add_rms_norm", [x, r, w, 1e-6, 0.0, None]) == \
        choice.choose("fused_add_rms_norm", [xs, rs, ws, 1e-6, 0.0, None])
    # a measurement of the class decides for the symbolic graph too
    args = [x, w, 1e-6, 0.0, None]
    choice.record(choice.shape_class("rms_norm", args), choice.device_key(), (16, 8192), (10.0, 50.0), (1.0, 5.0))
    assert choice.choose("rms_norm", args) == "kernel"
    _, xf, _, wf = fake_cuda_tokens(64, 4096, torch.float32)
    assert "float32 activations" in choice.explain("rms_norm_fp8_group", [xf, wf, 1e-6, 128])[1]


@pytest.mark.skipif(not library_ops.AVAILABLE, reason="triton not importable")
@pytest.mark.parametrize("mode", ["kernel", "auto"])
def test_lower_pass_traces_the_kernel_for_a_symbolic_token_count(triton_as_if_on_gpu, mode):
    def f(x, w):
        return cn.rms_norm_fp8_group(x, w, 1e-6, 128)

    fake_mode, x, _, w = fake_cuda_tokens(64, 4096)
    with fake_mode:
        graph = make_fx(f)(x, w).graph
    env = fake_mode.shape_env
    guards_before = len(env.guards)
    result = lower.LowerPass().run(graph, parse_options({"lowering": mode}))
    graph.lint()
    assert result.matched == 1 and not cn_nodes(graph)
    (k,) = kernel_nodes(graph)
    grid = k.kwargs["grid"][0][0]
    assert isinstance(grid, torch.fx.Node), grid  # computed from the token count, not a constant
    assert len(env.guards) == guards_before, "lowering put a guard on the token count"
    out = [n for n in graph.nodes if n.op == "output"][0]
    q, s = out.args[0]
    assert str(q.meta["val"].shape[0]) == str(x.shape[0])  # the same symbol
    assert tuple(s.meta["val"].shape[1:]) == (32,)


@pytest.mark.parametrize("weight", [True, False])
def test_inductor_mutation_analysis_of_the_backward_kernel(cuda_target_for_triton_frontend, weight):
    """The same analysis for the backward kernel, with PRECISE (compiled) and Python floats
    for eps / offset as Inductor hands them in: it must find dx (and the dweight partials)
    only. A failure makes Inductor copy every input of the kernel (seen on the H200 with
    torch 2.11 while the kernel converted eps with ``.to()``; it uses ``tl.cast`` now)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    from compile_norm.kernels import triton_backward as B
    from compile_norm.kernels import triton_backward_kernel as BK

    g, x, gr, dx = (torch.randn(8, 384, dtype=BF16) for _ in range(4))
    w, partials = torch.randn(384, dtype=BF16), torch.empty(4, 384)
    names = BK.rms_norm_backward_kernel.arg_names
    values = (g, x, w if weight else x, gr, dx, partials if weight else x, 8, 384, 384, 384, 1, 384,
              1e-6, 0.0, 384, 1, 512, weight, False, False, True, 3, False)
    kwargs = dict(zip(names, values))
    if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
        access = tkw.identify_accessed_tensors(BK.rms_norm_backward_kernel, kwargs, {})
        written = sorted(dep.name for dep in access.read_writes.writes)
    else:
        written = sorted(tkw.identify_mutated_tensors(BK.rms_norm_backward_kernel, kwargs, {}))
    assert written == sorted(B.written_args("rms_norm_backward_kernel", kwargs))


def test_measurements_are_kept_per_kernel_source(monkeypatch):
    """A changed kernel (forward or backward source) gets a new device key, so its shape
    classes are measured again rather than judged by the old kernel's times."""
    from compile_norm.kernels import triton_backward, triton_ops
    from compile_norm.lowerings import choice

    before = choice.device_key()
    assert f"torch {torch.__version__}" in before and triton_ops.SOURCE[:12] in before
    monkeypatch.setattr(triton_ops, "SOURCE", "0" * 64)
    forward_changed = choice.device_key()
    monkeypatch.setattr(triton_backward, "SOURCE", "1" * 64)
    backward_changed = choice.device_key()
    assert len({before, forward_changed, backward_changed}) == 3
