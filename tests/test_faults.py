"""Faults: a pass that breaks, a provider that cannot run, a compiled model used from threads."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from compile_helpers import assert_close, assert_close_q, cn, compile_run
from compile_norm.ops import registry
from compile_norm.ops.registry import Provider
from compile_norm.options import PASS_ORDER
from compile_norm.passes import manager
from compile_norm.passes.base import observe_stages
from helpers import child_env

EPS = 1e-6


def model(x, r, w, g):
    """Hand-written Llama norm after a residual add, a Gemma norm, a quantization, a gated
    norm and a normed sum of a norm's output: work for every pass (canonicalize, gemma, gated,
    residual, quant, sandwich, lower)."""
    h = x + r
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w
    q, s = cn.quant_int8_dynamic(y)
    z = cn.rms_norm(h, g.float() + 1.0, EPS)  # Gemma written with the offset in the weight
    u = cn.rms_norm(x, w, EPS) * torch.nn.functional.silu(r)  # Qwen3-Next's gated norm
    v = cn.rms_norm(r + cn.rms_norm(g.expand_as(x) * x, w, EPS), g, EPS)  # Gemma's sandwich
    return q, s, h, z, u, v


def inputs(dtype=torch.float32):
    return (torch.randn(6, 40, dtype=dtype), torch.randn(6, 40, dtype=dtype),
            torch.randn(40, dtype=dtype), torch.randn(40, dtype=dtype))


def check_outputs(got, want, dtype=torch.float32):
    assert_close_q(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, dtype)


def sabotage(monkeypatch, name):
    """Make pass ``name`` rewrite the graph (its real work, plus a wrong output) and then raise."""
    cls = manager.pass_for(name)
    real = cls.run

    def run(self, graph, options):
        real(self, graph, options)
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        first = out.args[0][0]
        with graph.inserting_before(out):
            wrong = graph.call_function(torch.ops.aten.neg.default, (first,))
        out.args = ((wrong, *out.args[0][1:]),)
        raise RuntimeError(f"injected fault in {name}")

    monkeypatch.setattr(cls, "run", run)


def test_every_pass_is_tested():
    assert set(PASS_ORDER) == {"canonicalize", "gemma", "gated", "residual", "quant", "sandwich",
                               "lower"}


def test_passes_do_work_on_the_model():
    a = inputs()
    c = compile_run(model, *a, dynamic=False, options={"strict": True})
    check_outputs(c.out, model(*a))
    for name in ("canonicalize", "gemma", "gated", "residual", "quant", "sandwich", "lower"):
        assert c.counts.get(f"{name}_matched", 0) >= 1, (name, c.counts)


@pytest.mark.parametrize("name", PASS_ORDER)
def test_fault_in_any_pass_leaves_correct_unfused_model(monkeypatch, name):
    sabotage(monkeypatch, name)
    a = inputs()
    with pytest.warns(RuntimeWarning, match=f"pass '{name}' failed and was skipped.*injected fault in {name}"):
        c = compile_run(model, *a, dynamic=False)
    assert c.counts[f"{name}_failed"] == 1
    assert c.counts.get(f"{name}_matched", 0) == 0  # its rewrites are gone
    check_outputs(c.out, model(*a))  # the wrong output node was rolled back too
    if name != "lower":
        assert "torch.ops.compile_norm" not in c.code  # later passes still ran (lower inlined)
    else:
        assert "torch.ops.compile_norm" in c.code  # IR ops kept: run as extern kernel calls


@pytest.mark.parametrize("name", PASS_ORDER)
def test_fault_with_strict_is_an_error(monkeypatch, name):
    sabotage(monkeypatch, name)
    with pytest.raises(Exception, match=f"compile_norm pass '{name}' failed: injected fault in {name}") as info:
        compile_run(model, *inputs(), dynamic=False, options={"strict": True})
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, manager.PassFailedError) for e in chain)


# --- providers whose requirements are missing -----------------------------------------------


@pytest.fixture
def unavailable_provider():
    p = Provider("needs_fpga", lambda *a, **k: 1 / 0, supported=False, rank=0, reason="no FPGA attached")
    registry.register_provider("rms_norm", p)
    yield p
    registry.unregister_provider("rms_norm", "needs_fpga")


def test_unavailable_provider_is_skipped_with_reason(unavailable_provider):
    x, w = torch.randn(3, 16), torch.randn(16)
    assert registry.unsupported_reasons("rms_norm")["needs_fpga"] == "no FPGA attached"
    assert "needs_fpga" not in [p.name for p in registry.chain("rms_norm")]
    with registry.providers_priority(["needs_fpga"]):  # asked for first: still skipped
        assert registry.which_provider("rms_norm", x, w, EPS) != "needs_fpga"
        torch.testing.assert_close(cn.rms_norm(x, w, EPS), registry.ops()["rms_norm"].reference(x, w, EPS))
    from compile_norm import cli
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["providers"]) == 0
    line = next(l for l in buf.getvalue().splitlines() if l.split()[0] == "rms_norm")
    assert "needs_fpga: no FPGA attached" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton runs here")
def test_triton_without_gpu_is_skipped_with_reason():
    from compile_norm.kernels import triton_ops

    from compile_norm.kernels import two_pass

    with_kernel = {s.name for s in triton_ops.kernel_specs()} | {"rms_norm_backward"} | set(two_pass.PASSES)
    assert "rms_norm" in with_kernel and "rms_norm_fp8_group" in with_kernel
    for name in registry.ops():
        reasons = registry.unsupported_reasons(name)
        # every op the kernels implement has the provider, unsupported with the reason
        assert ("triton" in reasons and bool(reasons["triton"])) == (name in with_kernel), name
        assert [p.name for p in registry.chain(name)] == ["native"]
    x = torch.randn(2, 32)
    assert registry.which_provider("rms_norm", x, None, EPS) == "native"
    out = subprocess.run([sys.executable, "-m", "compile_norm.cli", "providers"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.count("(unavailable: triton: ") == len(with_kernel)


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed: importing it raises
import compile_norm, torch
from compile_norm import cli
from compile_norm.ops import registry
reason = registry.unsupported_reasons("rms_norm")["triton"]
assert reason.startswith("triton is not importable (ModuleNotFoundError"), reason
x = torch.randn(3, 16)
assert registry.which_provider("rms_norm", x, None, 1e-6) == "native"
torch.testing.assert_close(torch.ops.compile_norm.rms_norm(x, None, 1e-6), registry.ops()["rms_norm"].reference(x, None, 1e-6))
cli.main(["providers"])
"""


def test_missing_triton_is_skipped_with_reason():
    # TRITON_INTERPRET=1 makes compile_norm try to import triton even without a GPU.
    env = child_env(TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", NO_TRITON], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == len(registry.ops())
    from compile_norm.kernels import triton_ops

    from compile_norm.kernels import two_pass

    with_kernel = {s.name for s in triton_ops.kernel_specs()} | {"rms_norm_backward"} | set(two_pass.PASSES)
    for line in lines:
        has_reason = "(unavailable: triton: triton is not importable (ModuleNotFoundError" in line
        assert has_reason == (line.split()[0].rstrip(":") in with_kernel), line


# --- threads --------------------------------------------------------------------------------


# torch < 2.12 applies dynamic=False as a process-wide patch of Dynamo's config, which threads
# entering and leaving it at once can leave applied (pytorch#118260; thread-local since 2.12):
# later compiles in this process would then never make a size dynamic.
@pytest.fixture
def dynamo_config_restored():
    saved = torch._dynamo.config.save_config()
    yield
    torch._dynamo.config.load_config(saved)


@pytest.mark.usefixtures("dynamo_config_restored")
def test_compiled_model_from_many_threads():
    a = inputs()
    torch._dynamo.reset()
    f = torch.compile(model, backend="compile_norm", dynamic=False, options={"strict": True})
    f(*a)  # compile once; the threads run the compiled code on their own inputs
    cases = [inputs() for _ in range(8)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = f(*cases[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for i, case in enumerate(cases):
        check_outputs(results[i], model(*case))


@pytest.mark.skipif(torch.__version__ < (2, 12), reason="torch 2.11's Dynamo segfaults when threads race into "
                    "a function's first compile, with backend='eager' too (pytorch#136833); 2.13 does not")
@pytest.mark.usefixtures("dynamo_config_restored")
def test_first_call_from_many_threads_at_once():
    """Threads race to the first call: one compile (Dynamo serializes it), right results."""
    torch._dynamo.reset()
    f = torch.compile(model, backend="compile_norm", dynamic=False)
    cases = [inputs() for _ in range(4)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(cases))

    def work(i):
        try:
            barrier.wait(timeout=60)
            results[i] = f(*cases[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for i, case in enumerate(cases):
        check_outputs(results[i], model(*case))


def sums_graph(n):
    """A post-grad-like graph (fake tensors in meta) with ``n`` residual sites."""
    def f(w, *xs):
        return [cn.rms_norm(xs[2 * i] + xs[2 * i + 1], w, EPS) for i in range(n)]

    mode = FakeTensorMode()
    with mode:
        args = [torch.empty(16), *(torch.empty(4, 16) for _ in range(2 * n))]
        return make_fx(f)(*args).graph


def test_pass_runs_in_two_threads_keep_their_own_state(monkeypatch):
    """One manager (as Inductor holds it) running on two graphs at once: every run has its own
    pass objects, so a run's checks and rewrites never record into another thread's result."""
    from compile_norm.passes.residual import ResidualPass

    sites = {0: 1, 1: 3}  # residual sites of each thread's graph
    graphs = {i: sums_graph(n) for i, n in sites.items()}
    barrier = threading.Barrier(2)
    waited = threading.local()
    real_check = ResidualPass._check

    def check(self, match):
        if not getattr(waited, "done", False):  # hold until both runs are inside the pass
            waited.done = True
            barrier.wait(timeout=30)
        return real_check(self, match)

    monkeypatch.setattr(ResidualPass, "_check", check)
    monkeypatch.setattr(manager, "PASSES", {"residual": ResidualPass})  # the rest is skipped
    manager_pass = manager.CompileNormPass({"passes": ["residual"], "strict": True})
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def observe(stage, graph, result):
        if stage == "residual":
            results[next(i for i, g in graphs.items() if g is graph)] = result

    def work(i):
        try:
            manager_pass(graphs[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in sites]
    with observe_stages(observe):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert {i: r.matched for i, r in results.items()} == sites
    assert results[0] is not results[1]
    # One run at a time per pass object, and nothing left on it after the run.
    p = ResidualPass()
    with p.running(None) as result:
        assert p.result is result
        with pytest.raises(RuntimeError, match="already running"):
            with p.running(None):
                pass
    assert p.result is None
