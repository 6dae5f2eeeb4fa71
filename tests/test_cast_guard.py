"""passes/cast_guard.py: a round to bf16 between two float32 values survives torch 2.11's
joint-graph cast folding, and the fusion patterns still see an ordinary cast.

On torch 2.12+ the guard is not installed (Inductor keeps the round itself); these tests force
it on, so the respelling is checked against the real joint-graph and post-grad passes on every
torch, and the folding torch 2.11 does is replayed by ``fold_float_chains``.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from compile_helpers import TOL, assert_close_q, compile_run, inductor_cpu_rounds_like_eager
from helpers import assert_bitwise_equal, randn
from test_gated_quant import Gated, fp8_per_token, qwen_norm

from compile_norm import backend
from compile_norm.passes import cast_guard

prims = torch.ops.prims


def round_trip(a):
    return a.to(torch.bfloat16).float() * 3.0


def traced(fn, *args) -> torch.fx.GraphModule:
    """``fn`` in ATen as Inductor's passes see it (casts are ``prims.convert_element_type``)."""
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def fold_float_chains(graph: torch.fx.Graph) -> None:
    """What torch 2.11's ``pointless_convert`` does: convert(convert(a, d1), d2) -> convert(a, d2)."""
    for node in list(graph.find_nodes(op="call_function", target=prims.convert_element_type.default)):
        inner = node.args[0]
        if isinstance(inner, torch.fx.Node) and inner.target is prims.convert_element_type.default:
            node.args = (inner.args[0], node.args[1])
    graph.eliminate_dead_code()


def cast_targets(graph: torch.fx.Graph) -> list:
    return [(n.target, n.args[1] if n.target is prims.convert_element_type.default else n.kwargs["dtype"])
            for n in graph.nodes if n.target in (prims.convert_element_type.default, torch.ops.aten._to_copy.default)]


def test_the_round_survives_folding_and_is_restored():
    a = randn(64, 33)
    gm = traced(round_trip, a)
    assert cast_guard.keep_narrowing_casts(gm.graph) == 1
    fold_float_chains(gm.graph)  # no chain of two converts is left for it to fold
    assert (torch.ops.aten._to_copy.default, torch.bfloat16) in cast_targets(gm.graph)
    cast_guard.restore(gm.graph)
    assert cast_targets(gm.graph) == [(prims.convert_element_type.default, torch.bfloat16),
                                      (prims.convert_element_type.default, torch.float32)]
    gm.recompile()
    assert_bitwise_equal(gm(a), round_trip(a))
    # without the guard the fold drops the round: the check above can fail
    bare = traced(round_trip, a)
    fold_float_chains(bare.graph)
    bare.recompile()
    assert not torch.equal(bare(a), round_trip(a))


@pytest.mark.parametrize("fn, expected", [
    (lambda a: a.float().to(torch.float64), 0),  # widening only: nothing to keep
    (lambda a: a.to(torch.bfloat16), 0),  # a round with no widening after it
    (lambda a: a.to(torch.bfloat16).float() + a.to(torch.float16).double(), 2),
    (lambda a: a.to(torch.int32).float(), 0),  # not a float chain
])
def test_only_narrowing_float_chains_are_respelled(fn, expected):
    a = randn(8, 16)
    gm = traced(fn, a)
    assert cast_guard.keep_narrowing_casts(gm.graph) == expected
    cast_guard.restore(gm.graph)
    gm.recompile()
    assert_bitwise_equal(gm(a), fn(a))


def test_backend_installs_the_guard_only_where_inductor_folds_the_round(monkeypatch):
    patches = backend.config_patches(backend.parse_options(None))
    assert ("joint_custom_pre_pass" in patches) == cast_guard.FOLDS_NARROWING_CASTS
    monkeypatch.setattr(cast_guard, "FOLDS_NARROWING_CASTS", True)
    assert isinstance(backend.config_patches(backend.parse_options(None))["joint_custom_pre_pass"],
                      cast_guard.KeepNarrowingCasts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_norm_then_fp8_fuses_with_the_guard_on(monkeypatch, dtype):
    """Qwen3-Next's gated norm ends in .to(x.dtype) and the quantizer starts with .float():
    with the guard in the real joint-graph passes the site fuses and keeps eager's bits."""
    monkeypatch.setattr(cast_guard, "FOLDS_NARROWING_CASTS", True)
    kept = []
    respell = cast_guard.keep_narrowing_casts
    monkeypatch.setattr(cast_guard, "keep_narrowing_casts", lambda g: kept.append(respell(g)))
    m = Gated(qwen_norm(96, dtype), fp8_per_token)
    x, gate = randn(3, 5, 96, dtype=dtype), randn(3, 5, 96, dtype=dtype, scale=3.0)
    with torch.no_grad():
        c = compile_run(m, x, gate, options={"strict": True})
        want = m(x, gate)
    assert kept == [1]  # the joint graph held the chain, and the guard respelled it
    assert c.counts["gated_matched"] == 1 and c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {"rms_norm_gated_fp8_dynamic"}
    assert len(c.kernels) == 1, c.kernels
    if inductor_cpu_rounds_like_eager():
        assert_bitwise_equal(c.out[0].float(), want[0].float())
        assert_bitwise_equal(c.out[1], want[1])
    else:  # torch 2.11's CPU code keeps float32 between the generated norm's pointwise ops
        assert_close_q(c.out[0], want[0])
        torch.testing.assert_close(c.out[1], want[1], rtol=TOL[dtype], atol=1e-12)
