"""Measure generated code against the Triton kernel for one op call, and record the winner.

``tune(op_name, *args)`` (real CUDA tensors, positional in schema order) times both
candidates the way benchmarks do (CUDA-graph replay, ``triton.testing.do_bench`` median, L2
flushed): the op's reference compiled by Inductor (``dynamic=False``: the code
``lowering="generated"`` would give this node alone) and the ``compile_norm_kernels`` kernel.
The result goes to ``choice.record`` (memory + ``<inductor cache dir>/compile_norm/choice.json``),
which ``lowering="auto"`` then prefers to the seed table; an entry is measured once.

Not done inside the ``lower`` pass: that runs within an Inductor compile, and compiling the
reference there would nest Inductor in itself. Call it ahead of compiling (a warm-up script),
or let ``benchmarks/suite.py --tune`` do it for the suite's shapes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..ops import registry
from . import choice


def graph_time_us(fn: Callable[[], Any]) -> float:
    """Median kernel time of ``fn`` replayed from a CUDA graph, L2 flushed."""
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3


def tune(op_name: str, *args: Any, force: bool = False) -> str:
    """Measure (unless already recorded and not ``force``) and return the choice."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError(f"compile_norm: tune needs CUDA tensors; x is {type(x).__name__} "
                         f"on {getattr(x, 'device', None)}")
    from ..kernels import library_ops

    hidden, tokens = x.shape[-1], x.numel() // max(1, x.shape[-1])
    key = choice.measured_key(op_name, x.dtype, hidden, tokens)
    entry = choice._load().get(key)
    if entry is not None and not force:
        return entry["choice"]
    if not library_ops.AVAILABLE or not library_ops.supports(op_name, *args):
        raise ValueError(f"compile_norm: the Triton kernel does not take op {op_name!r} with these arguments")
    reference = registry.ops()[op_name].reference
    compiled = torch.compile(reference, dynamic=False)
    kernel = library_ops.register()[op_name]  # the op's eager path launches without HOP dispatch
    generated_us = graph_time_us(lambda: compiled(*args))
    kernel_us = graph_time_us(lambda: kernel(*args))
    return choice.record(op_name, x.dtype, hidden, tokens, generated_us, kernel_us)
