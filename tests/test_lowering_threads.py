"""``lowerings.keep_ops()`` is private to its thread / task and never changes Inductor's tables:
a plain ``torch.compile(backend="inductor")`` compile inlines the compile_norm ops even while
a ``compile_norm`` backend compile (which keeps them) runs in another thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import torch
from torch._dynamo.utils import counters
from torch._inductor import decomposition
from torch._inductor.graph import GraphLowering
from torch.fx.experimental.proxy_tensor import make_fx

from compile_helpers import KERNEL_RE, _op_names, assert_close, assert_close_q, cn, compile_run, no_caches
from compile_norm import lowerings
from compile_norm.passes.base import observe_stages
from models import LlamaRMSNorm

EPS = 1e-6
JOIN_S = 300  # a compile on a loaded 2-core machine can take a while


def add_norm_quant(x, r, w):
    y, h = cn.fused_add_rms_norm(x, r, w, EPS)
    q, s = cn.quant_fp8_dynamic(y)
    return q, s, h


class HFNormQuant(torch.nn.Module):
    """An HF decoder's residual add and LlamaRMSNorm, then an fp8 quant op called directly
    (its node reaches the passes only if the backend's compile keeps it)."""

    def __init__(self, hidden, dtype):
        super().__init__()
        self.norm = LlamaRMSNorm(hidden, dtype=dtype)

    def forward(self, x, residual):
        h = x + residual
        q, s = cn.quant_fp8_dynamic(self.norm(h))
        return q, s, h


def inputs(hidden=40, dtype=torch.bfloat16):
    x = torch.randn(2, 3, hidden, dtype=dtype)
    return x, torch.randn_like(x), torch.randn(hidden, dtype=dtype)


def table_entries():
    return {op: decomposition.decompositions.get(op) for op in lowerings.op_overloads()}


def kept_ops(fn, *args) -> set[str]:
    """compile_norm ops left in ``fn``'s graph when traced with Inductor's decomposition table."""
    return _op_names(make_fx(fn, decomposition_table=decomposition.select_decomp_table())(*args).graph)


@contextlib.contextmanager
def per_thread_output():
    """``{thread id: [generated code]}`` and ``{thread id: [(stage, ops)]}`` of the compiles
    inside. (``run_and_get_code`` patches a class attribute and resets Dynamo: not for threads.)"""
    codes: dict[int, list[str]] = {}
    stages: dict[int, list] = {}

    def save_code(code: str) -> None:
        codes.setdefault(threading.get_ident(), []).append(code)

    def save_stage(stage, graph, result) -> None:
        stages.setdefault(threading.get_ident(), []).append((stage, _op_names(graph)))

    saved = GraphLowering.save_output_code
    GraphLowering.save_output_code = save_code
    try:
        with observe_stages(save_stage):
            yield codes, stages
    finally:
        GraphLowering.save_output_code = saved


def test_keep_ops_declines_in_its_own_thread_only():
    x, r, w = inputs()
    entry = decomposition.decompositions[cn.fused_add_rms_norm.default]
    assert kept_ops(add_norm_quant, x, r, w) == set()
    with lowerings.keep_ops():
        assert entry(x, r, w, EPS) is NotImplemented
        assert kept_ops(add_norm_quant, x, r, w) == {"fused_add_rms_norm", "quant_fp8_dynamic"}
        with lowerings.keep_ops():  # nested: leaving the inner one keeps the outer's request
            pass
        assert entry(x, r, w, EPS) is NotImplemented
    torch.testing.assert_close(entry(x, r, w, EPS), cn.fused_add_rms_norm(x, r, w, EPS))


def test_plain_compile_inlines_while_another_thread_keeps_ops():
    x, r, w = inputs()
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def hold_keep_ops():
        with lowerings.keep_ops():
            try:
                entry = decomposition.decompositions.get(cn.fused_add_rms_norm.default)
                seen["declines"] = entry is not None and entry(x, r, w, EPS) is NotImplemented
            finally:
                entered.set()
            release.wait(JOIN_S)

    holder = threading.Thread(target=hold_keep_ops)
    holder.start()
    try:
        assert entered.wait(JOIN_S)
        c = compile_run(add_norm_quant, x, r, w, backend="inductor")
    finally:
        release.set()
        holder.join(JOIN_S)
    assert "compile_norm" not in c.code and len(c.kernels) == 1
    assert seen["declines"] is True
    assert_close_q(c.out[0], add_norm_quant(x, r, w)[0])


def test_keep_ops_is_private_to_an_asyncio_task():
    x, r, w = inputs()
    entry = decomposition.decompositions[cn.fused_add_rms_norm.default]

    async def main():
        inside = asyncio.Event()
        release = asyncio.Event()

        async def keeper():
            with lowerings.keep_ops():
                inside.set()
                await release.wait()
                return entry(x, r, w, EPS)

        task = asyncio.create_task(keeper())
        await inside.wait()
        other = entry(x, r, w, EPS)  # this task, while the keeper is inside keep_ops()
        release.set()
        return other, await task

    other, kept = asyncio.run(main())
    assert kept is NotImplemented and isinstance(other, tuple)


def test_backend_compile_leaves_inductor_table_untouched():
    x, r, w = inputs()
    before = table_entries()
    merged_before = {op: decomposition.select_decomp_table().get(op) for op in before}
    assert all(callable(e) for e in before.values())
    during = []
    with observe_stages(lambda stage, graph, result: during.append(table_entries())):
        c = compile_run(add_norm_quant, x, r, w)
    assert c.ops("canonicalize", "before") == {"fused_add_rms_norm", "quant_fp8_dynamic"}  # kept
    assert c.counts["quant_matched"] == 1 and during
    for entries in during + [table_entries()]:
        assert all(entries[op] is before[op] for op in before)
    assert all(decomposition.select_decomp_table().get(op) is merged_before[op] for op in before)


def test_caches_tell_plain_and_backend_compiles_apart():
    from torch._inductor.utils import fresh_cache

    x, r, w = inputs()
    hits = lambda: counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]  # noqa: E731
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        plain = compile_run(add_norm_quant, x, r, w, backend="inductor", caches=True)
        backend = compile_run(add_norm_quant, x, r, w, caches=True)
        assert hits() == 0 and backend.counts["quant_matched"] == 1  # not the plain graph reused
        again = compile_run(add_norm_quant, x, r, w, backend="inductor", caches=True)
        assert hits() >= 1
    for c in (plain, again):
        assert "compile_norm" not in c.code and len(c.kernels) == 1
    for c in (plain, backend, again):
        assert_close_q(c.out[0], add_norm_quant(x, r, w)[0])


def test_plain_and_backend_compiles_in_two_threads_at_once():
    x, r, w = inputs()
    model = HFNormQuant(x.shape[-1], x.dtype)
    want_plain, want_model = add_norm_quant(x, r, w), model(x, r)
    for _ in range(3):
        torch._dynamo.reset()
        barrier = threading.Barrier(2, timeout=JOIN_S)
        outs: dict[str, object] = {}
        idents: dict[str, int] = {}
        errors: list[BaseException] = []

        def compile_in_thread(name, fn, args, **compile_kwargs):
            def run():
                try:
                    idents[name] = threading.get_ident()
                    compiled = torch.compile(fn, **compile_kwargs)
                    barrier.wait()
                    with no_caches():  # config patches may be private to a thread (torch 2.13)
                        outs[name] = compiled(*args)
                except BaseException as e:  # re-raised in the test's thread
                    errors.append(e)
                    barrier.abort()
            return threading.Thread(target=run, name=name)

        threads = [compile_in_thread("plain", add_norm_quant, (x, r, w), backend="inductor"),
                   compile_in_thread("backend", model, (x, r), backend="compile_norm")]
        with per_thread_output() as (codes, stages):
            for t in threads:
                t.start()
            for t in threads:
                t.join(JOIN_S)
        if errors:
            raise errors[0]
        plain_code = "\n".join(codes[idents["plain"]])
        assert "compile_norm" not in plain_code and len(KERNEL_RE.findall(plain_code)) == 1
        assert idents["plain"] not in stages  # the backend's passes ran only in its own thread
        backend_stages = dict(stages[idents["backend"]])
        assert backend_stages["input"] == {"quant_fp8_dynamic"}  # kept by this thread's compile
        assert backend_stages["quant"] == {"fused_add_rms_norm_fp8_dynamic"}  # HF norm fused
        assert backend_stages["lower"] == set()
        backend_code = "\n".join(codes[idents["backend"]])
        assert "compile_norm" not in backend_code and len(KERNEL_RE.findall(backend_code)) == 1
        for got, want in ((outs["plain"], want_plain), (outs["backend"], want_model)):
            assert_close_q(got[0], want[0])
            assert_close(got[1], want[1], x.dtype)
            assert_close(got[2], want[2], x.dtype)
