"""Shared helpers of the compile tests: compile fresh, collect code, counters and graphs."""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from compile_norm.passes.base import observe_stages

cn = torch.ops.compile_norm
KERNEL_RE = re.compile(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.M)


@dataclass
class Compiled:
    out: object
    code: str
    counts: dict
    stats: dict
    stages: list = field(default_factory=list)  # [(stage, set of op names in the graph)]

    @property
    def kernels(self) -> list[str]:
        return KERNEL_RE.findall(self.code)

    def ops(self, name: str, phase: str) -> set[str]:
        """compile_norm ops in the graph before / after pass ``name``."""
        names = [stage for stage, _ in self.stages]
        i = names.index(name)
        return self.stages[i - 1 if phase == "before" else i][1]


def _op_names(graph: torch.fx.Graph) -> set[str]:
    names = set()
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", "") == "compile_norm":
            names.add(node.target._schema.name.split("::")[1])
    return names


@contextlib.contextmanager
def no_caches():
    """Compile for real (the passes run) instead of loading a cached graph."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def compile_run(fn, *args, backend="compile_norm", options=None, dynamic=None, caches=False, **kw) -> Compiled:
    torch._dynamo.reset()
    counters.clear()
    stages: list = []
    compile_kwargs = {"backend": backend, "dynamic": dynamic, **kw}
    if options is not None:
        compile_kwargs["options"] = options
    compiled = torch.compile(fn, **compile_kwargs)
    ctx = contextlib.nullcontext() if caches else no_caches()
    with ctx, observe_stages(lambda stage, g, result: stages.append((stage, _op_names(g)))):
        out, codes = run_and_get_code(compiled, *args)
    return Compiled(out, "\n".join(codes), dict(counters["compile_norm"]), dict(counters["stats"]), stages)


def compile_run_amax_left(fn, *args, **kw) -> tuple[Compiled, bool]:
    """``compile_run``, plus whether an amax reduction is still in the graph after the quant
    pass (a hand-written quantization that fused leaves none)."""
    seen = {}

    def observe(stage, graph, result):
        if stage == "quant":
            seen["amax"] = any(n.target is torch.ops.aten.amax.default for n in graph.nodes)

    with observe_stages(observe):
        c = compile_run(fn, *args, **kw)
    return c, seen["amax"]


def assert_close_q(actual: torch.Tensor, expected: torch.Tensor, scale=None) -> None:
    """Quantized outputs agree within one quantization step (Inductor keeps fp32 intermediates
    where eager rounds to x.dtype, which may move a value across a rounding boundary)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.int8:
        assert (actual.int() - expected.int()).abs().max().item() <= 1
        return
    a, e = actual.float(), expected.float()
    # e4m3 has 3 mantissa bits: neighbours differ by at most 2**-3 relative (plus subnormals).
    torch.testing.assert_close(a, e, rtol=0.13, atol=2.0**-9 * 2)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype) -> None:
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * 2)


@functools.cache
def inductor_cpu_rounds_like_eager() -> bool:
    """Whether this torch's Inductor CPU code, with ``emulate_precision_casts``, rounds a
    bf16 intermediate between two pointwise ops as eager does (torch 2.13: yes; 2.11: no, it
    keeps float32 there, so no lowering can give eager's bits on that CPU backend)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = (1 + 0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(1))).bfloat16()

    def f(x, w):
        return x.float().mul(1.7).to(torch.bfloat16) * w

    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True, fx_graph_cache=False):
        got = torch.compile(f, backend="inductor", fullgraph=True)(x, w)
    torch._dynamo.reset()
    return torch.equal(got, f(x, w))
