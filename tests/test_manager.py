import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from compile_helpers import assert_close, assert_close_q, cn, compile_run
from compile_norm import parse_options
from compile_norm.ops import registry
from compile_norm.options import NUMERICS_DEFAULTS, inductor_has
from compile_norm.passes import cache_key, manager, residual
from compile_norm.passes.manager import CompileNormPass
from helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(x, r, w, s):
    h = x + r
    return cn.quant_fp8_static(cn.rms_norm(h, w, 1e-6), s), h


def args():
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    return x, torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16), torch.tensor(0.02)


# --- options ---------------------------------------------------------------------------------


def test_options_parse_and_reject_unknown_keys():
    o = parse_options({"lowering": "kernel", "passes": ["residual", "gemma"], "max_autotune": False})
    assert o.passes == ("gemma", "residual") and o.lowering == "kernel"
    # eager's numerics by default
    # batch_invariant is forwarded to Inductor where it has the setting (torch >= 2.12)
    forwarded = lambda v: {"batch_invariant": v} if inductor_has("batch_invariant") else {}  # noqa: E731
    assert o.inductor_config == {"max_autotune": False, **NUMERICS_DEFAULTS, **forwarded(True)}
    off = parse_options({"batch_invariant": False, "emulate_precision_casts": False})
    assert off.inductor_config == {**forwarded(False), "emulate_precision_casts": False}
    assert not off.batch_invariant and o.batch_invariant
    with pytest.raises(ValueError, match="'measure' must be a bool"):
        parse_options({"measure": "yes"})
    with pytest.raises(ValueError, match="unknown option.*'fusee'"):
        parse_options({"fusee": True})
    with pytest.raises(ValueError, match="'lowering' must be one of"):
        parse_options({"lowering": "fast"})
    with pytest.raises(ValueError, match="unknown pass"):
        parse_options({"passes": ["residual", "nope"]})
    with pytest.raises(ValueError, match="'strict' must be a bool"):
        parse_options({"strict": 1})


# --- cache key -------------------------------------------------------------------------------


def test_uuid_changes_with_everything_that_changes_output():
    base = CompileNormPass({}).uuid()
    assert CompileNormPass({}).uuid() == base  # deterministic
    assert CompileNormPass({"quant_fusion": False}).uuid() != base
    assert CompileNormPass({"lowering": "kernel"}).uuid() != base
    assert CompileNormPass({"providers": ["native"]}).uuid() != base
    # a provider ahead of native changes the chain, and so the key; scoping it away again
    # gives the chain, and so the key, of before (a state, not a history)
    registry.register_provider("rms_norm", registry.Provider("probe", lambda *a: None, rank=5))
    try:
        with_probe = CompileNormPass({}).uuid()
        assert with_probe != base
        with registry.providers_priority({"rms_norm": ["native"]}):
            assert CompileNormPass({}).uuid() != with_probe
    finally:
        registry.unregister_provider("rms_norm", "probe")
    assert CompileNormPass({}).uuid() == base
    files = hashed_files()
    for f in ("passes/residual.py", "passes/patterns.py", "ops/norm.py", "lowerings/__init__.py",
              "kernels/__init__.py", "options.py", "backend.py"):
        assert f in files


def hashed_files():
    return {p.relative_to(cache_key.PACKAGE_ROOT).as_posix() for p in cache_key.graph_source_files()}


def test_uuid_hashes_only_the_sources_that_shape_the_graph():
    files = hashed_files()
    assert "passes/manager.py" in files and "ops/registry.py" in files
    assert not [f for f in files if f.startswith("inspect/")]
    assert "cli.py" not in files
    package = {p.relative_to(cache_key.PACKAGE_ROOT).as_posix() for p in cache_key.PACKAGE_ROOT.rglob("*.py")}
    assert {f for f in package if f.startswith("inspect/")} and "cli.py" in package  # they exist


def test_uuid_changes_with_the_pass_sources(monkeypatch):
    base = CompileNormPass({}).uuid()
    monkeypatch.setattr(cache_key, "source_hash", lambda: "a pass source changed")
    assert CompileNormPass({}).uuid() != base


def test_uuid_is_the_same_after_priority_set_and_reset():
    base = CompileNormPass({}).uuid()
    try:
        registry.set_priority({"rms_norm": ["native"]})
        CompileNormPass({}).uuid()
    finally:
        registry.set_priority(None)
    assert CompileNormPass({}).uuid() == base  # the state is the same again, the key too


UUID_SCRIPT = textwrap.dedent(
    """
    import sys
    import compile_norm
    from compile_norm.passes.manager import CompileNormPass
    if sys.argv[1] == "set-and-reset":
        compile_norm.set_priority({"rms_norm": ["native"]})
        compile_norm.set_priority(None)
    print(CompileNormPass({}).uuid())
    """
)


def test_uuid_is_the_same_in_fresh_processes(tmp_path, monkeypatch):
    from compile_norm.lowerings import choice

    # The same (empty) table of measured kernel choices here and in the children.
    monkeypatch.setenv("COMPILE_NORM_CHOICE_CACHE", str(tmp_path / "choice.json"))
    choice.reset_measured()
    env = child_env()

    def uuid(mode):
        p = subprocess.run([sys.executable, "-c", UUID_SCRIPT, mode], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout.strip().splitlines()[-1]

    try:
        mine = CompileNormPass({}).uuid()
        assert uuid("fresh") == uuid("fresh") == uuid("set-and-reset") == mine
    finally:
        monkeypatch.undo()
        choice.reset_measured()


def _hits():
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def test_stale_graph_never_reused_in_process():
    from torch._inductor.utils import fresh_cache

    a = args()
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        first = compile_run(model, *a, options={}, caches=True)
        assert first.counts["quant_matched"] == 1 and _hits() == 0
        again = compile_run(model, *a, options={}, caches=True)
        assert _hits() >= 1 and not again.stages  # reused: no passes ran
        assert again.counts == first.counts  # ... and their results came back with the graph
        other = compile_run(model, *a, options={"quant_fusion": False}, caches=True)
        assert _hits() == 0, "a graph compiled with other options was reused"
        assert other.ops("lower", "before") == {"fused_add_rms_norm", "quant_fp8_static"}
        for c in (first, again, other):
            assert_close_q(c.out[0], model(*a)[0])


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import compile_norm
    from torch._dynamo.utils import counters
    cn = torch.ops.compile_norm
    def model(x, r, w, s):
        h = x + r
        return cn.quant_fp8_static(cn.rms_norm(h, w, 1e-6), s), h
    torch.manual_seed(0)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    a = (x, torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16), torch.tensor(0.02))
    with torch._inductor.config.patch(fx_graph_cache=True):
        out = torch.compile(model, backend="compile_norm", options=json.loads(sys.argv[1]))(*a)
    print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
                      "cn": dict(counters["compile_norm"])}))
    """
)


def test_stale_graph_never_reused_across_processes(tmp_path):
    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))

    def run(options):
        p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    a = run({})
    assert a["hit"] == 0 and a["cn"]["quant_matched"] == 1
    warm = run({})
    assert warm["hit"] >= 1 and warm["cn"] == a["cn"]  # results stored with the cached graph
    b = run({"quant_fusion": False})
    assert b["hit"] == 0 and "quant_matched" not in b["cn"] and b["cn"]["residual_matched"] == 1


# --- failures ---------------------------------------------------------------------------------


@pytest.fixture
def broken_residual(monkeypatch):
    real = residual.ResidualPass.run

    def run(self, graph, options):
        real(self, graph, options)  # rewrite the graph, then fail: the rewrite must be undone
        raise RuntimeError("boom")

    monkeypatch.setattr(residual.ResidualPass, "run", run)


def test_failing_pass_warns_and_leaves_graph_unfused(broken_residual):
    a = args()
    with pytest.warns(RuntimeWarning, match="pass 'residual' failed.*boom"):
        c = compile_run(model, *a)
    assert c.counts["residual_failed"] == 1
    assert c.ops("residual", "after") == {"rms_norm", "quant_fp8_static"}  # restored
    assert c.counts["quant_matched"] == 1  # later passes still run
    want = model(*a)
    assert_close_q(c.out[0], want[0])
    assert_close(c.out[1], want[1], torch.bfloat16)


def test_strict_turns_failure_into_error(broken_residual):
    with pytest.raises(Exception, match="compile_norm pass 'residual' failed: boom"):
        compile_run(model, *args(), options={"strict": True})


def test_missing_pass_is_skipped(monkeypatch):
    assert manager.pass_for("no_such_pass") is None
    assert all(manager.pass_for(name).name == name for name in manager.PASS_ORDER)
    monkeypatch.setattr(manager, "PASSES", {k: v for k, v in manager.PASSES.items() if k != "quant"})
    c = compile_run(model, *args(), options={"strict": True})
    assert c.counts["residual_matched"] == 1 and "quant_matched" not in c.counts
    assert [stage for stage, _ in c.stages] == ["input", "canonicalize", "gemma", "gated", "residual",
                                                "sandwich", "lower"]
