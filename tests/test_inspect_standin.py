"""A stand-in for the compile_norm backend, used by the inspection tests until the real one lands.

It compiles with Inductor and runs one post-grad "canonicalize" pass that reports to
``compile_norm.passes.base.notify_stage`` exactly as the real pass manager does: stage "input"
before any pass, then each pass's name and PassResult. The pass is deliberately small: it turns
``x * rsqrt(mean(x * x | x ** 2, -1, keepdim) + eps)`` into ``compile_norm.rms_norm(x, None, eps)``
and reports every other ``rsqrt`` as an unmatched site, so the tool has real sites to show.
A no-op "lower" stage follows so a graph has more than one stage.

The CLI and the examples reach it as ``--backend tests/test_inspect_standin.py:backend``.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import compile_norm  # noqa: F401  (registers torch.ops.compile_norm)
from compile_norm.passes.base import PassResult, notify_stage
from compile_helpers import no_caches

aten = torch.ops.aten


def _square_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """``x`` when node is ``x * x`` or ``x ** 2``."""
    if node.target == aten.pow.Tensor_Scalar and node.args[1] == 2:
        return node.args[0]
    if node.target == aten.mul.Tensor and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def canonicalize(graph: torch.fx.Graph) -> PassResult:
    result = PassResult("canonicalize")
    for rsqrt in list(graph.find_nodes(op="call_function", target=aten.rsqrt.default)):
        site = rsqrt.name
        add = rsqrt.args[0]
        mean = add.args[0] if getattr(add, "target", None) == aten.add.Tensor else None
        ok = (
            mean is not None
            and mean.target == aten.mean.dim
            and list(mean.args[1]) in ([-1], [mean.args[0].meta["val"].dim() - 1])
            and isinstance(add.args[1], float)
        )
        x = _square_of(mean.args[0]) if ok else None
        muls = [u for u in rsqrt.users if u.target == aten.mul.Tensor and x in u.args]
        if x is None or len(muls) != 1 or len(rsqrt.users) != 1:
            result.skip(site, "not x * rsqrt(mean(x ** 2, -1) + eps)")
            continue
        mul = muls[0]
        with graph.inserting_before(mul):
            norm = graph.call_function(
                torch.ops.compile_norm.rms_norm.default, (x, None, add.args[1])
            )
        norm.meta.update(mul.meta)
        mul.replace_all_uses_with(norm)
        result.matched += 1
    graph.eliminate_dead_code()
    return result


class StandinPasses(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        notify_stage("input", graph)
        result = canonicalize(graph)
        result.publish()
        notify_stage("canonicalize", graph, result)
        notify_stage("lower", graph, PassResult("lower"))

    def uuid(self):
        return "compile_norm-inspect-standin"


def backend(gm, example_inputs, options=None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(
        gm, example_inputs, config_patches={"post_grad_custom_post_pass": StandinPasses()}
    )


# --- tests of the stand-in itself -------------------------------------------------------------


def test_standin_rewrites_a_handwritten_norm():
    from torch._dynamo.utils import counters

    def f(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * 2.0

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(3, 20)
    # A warm FX graph cache would skip the post-grad pass whose run this test counts.
    with no_caches():
        out = torch.compile(f, backend=backend)(x)
    torch.testing.assert_close(out, f(x))
    assert counters["compile_norm"]["canonicalize_matched"] == 1
