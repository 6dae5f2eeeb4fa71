"""Time generated code against the Triton kernel for one shape class, and record the winner.

``measure_class`` is what ``lowering="auto"`` calls at compile time (the ``measure`` option)
for a node whose shape class has no measurement on this device. For each token count of
``choice.MEASURE_TOKENS`` it builds real CUDA inputs shaped like the node's (random values,
positive scales), and times both candidates the way the benchmarks do (CUDA-graph replay,
``triton.testing.do_bench`` median, L2 flushed):

- generated: the op's reference traced with ``make_fx`` and compiled by Inductor with the
  settings of the compile under way, less compile_norm's passes (the code
  ``lowering="generated"`` gives this node alone);
- kernel: the op's ``compile_norm_kernels`` library op (the Triton kernel), under each launch
  configuration of ``triton_ops.few_configs`` (the default, its persistent variant and its
  late load schedule); the fastest
  is recorded with the choice and used when the node is lowered to the kernel. Eager calls keep
  the default configuration, so their bits never depend on what a compile measured.

The work runs in a worker thread that the compile waits for: Inductor cannot be entered
again from the thread that is inside it (its graph handler and tracing context are
per-thread), a fresh thread starts clean. The cost is bounded: at most ``budget_s()`` seconds
per process (``COMPILE_NORM_MEASURE_BUDGET_S``, default 60; a class costs 3-8 s), after which
the seed table decides. Each measurement goes to ``choice.record`` (memory + disk, keyed by
device), so a class is measured once per card and software stack.

``tune(op_name, *args)`` takes the same measurement from real tensors, ahead of a compile.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import torch

from ..ops import registry
from . import choice

log = logging.getLogger("compile_norm.lowerings")
_SPENT = [0.0]  # seconds of compile time spent measuring in this process
_SPENT_LOCK = threading.Lock()


def budget_s() -> float:
    try:
        return float(os.environ.get("COMPILE_NORM_MEASURE_BUDGET_S", "60"))
    except ValueError:
        return 60.0


def spent_s() -> float:
    """Compile time this process has spent measuring."""
    return _SPENT[0]


def capture_graph(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` warmed up on a side stream, then captured as a CUDA graph."""
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
    return graph


def replay_time_us(graph: torch.cuda.CUDAGraph) -> float:
    """Median time of one replay of ``graph``, L2 flushed."""
    import triton

    return triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3


def graph_time_us(fn: Callable[[], Any]) -> float:
    """Median kernel time of ``fn`` replayed from a CUDA graph, L2 flushed."""
    return replay_time_us(capture_graph(fn))


def concrete_args(fake_args: Sequence[Any], tokens: int) -> list:
    """Real CUDA arguments like ``fake_args``, with ``tokens`` rows: tensors shaped like x get
    [tokens, H] (random normal), other floating tensors keep their shape with values in
    [0.5, 1) (weights, positive scales), integer ones are zeros; scalars are kept."""
    x = fake_args[0]
    hidden = int(x.shape[-1])
    out = []
    for a in fake_args:
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif choice.shaped_like(a, x):
            out.append(torch.randn(tokens, hidden, device="cuda").to(a.dtype))
        elif a.dtype.is_floating_point:
            out.append((0.5 + 0.5 * torch.rand(tuple(int(d) for d in a.shape), device="cuda")).to(a.dtype))
        else:
            out.append(torch.zeros(tuple(int(d) for d in a.shape), device="cuda", dtype=a.dtype))
    return out


def _generated(op_name: str, args: list) -> Callable[[], Any]:
    """The reference compiled by Inductor alone, with the current Inductor settings but none
    of compile_norm's passes (they would find the norm again and ask for this measurement)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    reference = registry.ops()[op_name].reference
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    tensors = [args[i] for i in where]

    def with_tensors(*ts):  # the graph takes the tensors; scalars are constants, as in a model
        full = list(args)
        for i, t in zip(where, ts):
            full[i] = t
        return reference(*full)

    gm = make_fx(with_tensors)(*tensors)
    ours = {k: None for k in ("pre_grad_custom_pass", "joint_custom_pre_pass", "post_grad_custom_pre_pass",
                              "post_grad_custom_post_pass") if hasattr(config, k)}
    with config.patch(ours):
        compiled = compile_fx(gm, tensors)
    return lambda: compiled(*tensors)


def _time_candidates(op_name: str, fake_args: Sequence[Any], tokens: Sequence[int]):
    """(generated us per token count, the best kernel config's us, that config or None)."""
    from ..kernels import library_ops, triton_ops

    registered = library_ops.register()
    if op_name in triton_ops.FUNCTIONS:  # one launch; the op's eager path has no HOP dispatch
        kernel = registered[op_name]
        spec = registry.spec(op_name)
        hidden = int(fake_args[0].shape[-1])
        configs = triton_ops.few_configs(hidden, *triton_ops.launch_key(spec, tuple(fake_args)))
    else:  # the backward, per-tensor FP8's two passes: launches of their own, default configs
        kernel, configs = registered.get(op_name) or library_ops.functions()[op_name], [None]
    inputs = {t: concrete_args(fake_args, t) for t in tokens}
    configs = _bit_identical_configs(kernel, configs, inputs.values())
    generated_us, kernel_us = [], {cfg: [] for cfg in configs}
    for t in tokens:
        args = inputs[t]
        generated_us.append(graph_time_us(_generated(op_name, args)))
        for cfg in configs:
            with triton_ops.launch_config_used(cfg):
                kernel_us[cfg].append(graph_time_us(lambda: kernel(*args)))
    best = min(configs, key=lambda cfg: statistics.geometric_mean(kernel_us[cfg]))
    return generated_us, kernel_us[best], best


def _bits(out: Any) -> list:
    """The outputs of one call as raw bytes (float8 has no torch.equal; -0 differs from 0)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().reshape(-1).view(torch.uint8) if isinstance(o, torch.Tensor) else o for o in outs]


def _same(got: list, want: list) -> bool:
    return all(torch.equal(g, w) if isinstance(g, torch.Tensor) else g is w for g, w in zip(got, want))


def _bit_identical_configs(kernel: Callable[..., Any], configs: list, inputs) -> list:
    """The configs whose outputs equal the default's (``configs[0]``, what eager launches) bit
    for bit on every measurement input. Warps, rows per program and tiling shape the reduction
    tree, so a config may move the last bit of rstd; the compiled result must stay the eager
    one, so such a config is never a candidate, however fast."""
    from ..kernels import triton_ops

    kept = list(configs)
    for args in inputs if len(configs) > 1 else ():
        with triton_ops.launch_config_used(configs[0]):
            want = _bits(kernel(*args))
        for cfg in kept[1:]:
            with triton_ops.launch_config_used(cfg):
                same = _same(_bits(kernel(*args)), want)
            if not same:
                log.info("compile_norm: launch config %s rounds unlike the default %s: not a candidate",
                         cfg, configs[0])
                kept.remove(cfg)
    return kept


def _in_worker(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh thread and wait for it; its exception is raised here."""
    result: dict[str, Any] = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller
            result["error"] = e

    worker = threading.Thread(target=work, name="compile_norm-measure", daemon=True)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def measure_class(op_name: str, fake_args: Sequence[Any], key: str, device: str,
                  bounded: bool = True) -> dict | None:
    """Measure the shape class ``key`` (``choice.shape_class``) on ``device`` and record it;
    None (the table decides) if measuring fails or, when ``bounded`` (compile time), once
    the budget is spent."""
    if bounded and spent_s() >= budget_s():
        log.info("compile_norm: measuring budget (%.0f s) spent; %s follows the table", budget_s(), key)
        return None
    fake_args = registry.spec(op_name).bind(tuple(fake_args), {})  # the launches need every argument
    tclass = key.split("|")[3]
    tokens = choice.MEASURE_TOKENS[tclass]
    start = time.perf_counter()
    try:
        generated_us, kernel_us, config = _in_worker(lambda: _time_candidates(op_name, fake_args, tokens))
    except Exception as e:  # a failed measurement must not fail the compile
        log.warning("compile_norm: measuring %s failed (%s: %s); the table decides", key, type(e).__name__, e)
        return None
    finally:
        if bounded:
            with _SPENT_LOCK:
                _SPENT[0] += time.perf_counter() - start
    seconds = time.perf_counter() - start
    from ..kernels import triton_ops

    picked = choice.record(key, device, tokens, generated_us, kernel_us, seconds,
                           config=None if config is None else triton_ops.config_to_json(config))
    from torch._dynamo.utils import counters

    from ..passes.base import COUNTER_GROUP

    counters[COUNTER_GROUP]["choice_measured"] += 1
    log.info("compile_norm: measured %s in %.1f s: generated %s us, kernel %s us (config %s) -> %s",
             key, seconds, generated_us, kernel_us, config, picked)
    return choice.measured(key, device)


def tune(op_name: str, *args: Any, batch_invariant: bool = True, force: bool = False) -> str:
    """Measure (unless on record and not ``force``) the shape class of this call and return
    the choice: a warm-up ahead of compiling. ``args``: real CUDA tensors, schema order
    (trailing defaults may be left out, as in a call of the op)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError(f"compile_norm: tune needs CUDA tensors; x is {type(x).__name__} "
                         f"on {getattr(x, 'device', None)}")
    from ..kernels import library_ops

    if not library_ops.AVAILABLE or not library_ops.supports(op_name, *args):
        raise ValueError(f"compile_norm: the Triton kernel does not take op {op_name!r} with these arguments")
    key = choice.shape_class(op_name, args, batch_invariant)
    device = choice.device_key(x.device)
    entry = None if force else choice.measured(key, device)
    if entry is None:  # an explicit warm-up is not compile time: no budget
        entry = measure_class(op_name, args, key, device, bounded=False)
    if entry is None:
        raise RuntimeError(f"compile_norm: measuring {op_name} failed (see the log)")
    return entry["choice"]
