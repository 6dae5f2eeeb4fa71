"""inspect_model: compile a model with the backend while watching every pass stage."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

from ..options import parse_options
from ..passes.base import COUNTER_GROUP, observe_stages
from . import bench as bench_mod
from . import kernels as kernels_mod
from . import numerics, training
from .record import StageRecorder
from .report import InspectReport


def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ValueError(
        "example_inputs must be a tensor or a tuple/list of positional arguments, got "
        f"{type(example_inputs).__name__}"
    )


def _title(model) -> str:
    if isinstance(model, torch.nn.Module):
        return type(model).__name__
    return getattr(model, "__name__", type(model).__name__)


def _device_of(model, inputs: tuple) -> str:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return str(x.device)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return str(p.device)
    return "cpu"


def _no_caches():
    """Inductor's FX graph cache and AOTAutograd's cache skip the post-grad passes on a hit, so
    the stages would not be seen. These two only: ``force_disable_caches`` would also turn off
    Dynamo's profile-guided dynamic shapes, with a warning on every run."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def _clone(inputs: tuple) -> tuple:
    # a model that writes into its inputs must not see the previous run's writes
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _check_backend(backend) -> str:
    if callable(backend):
        return getattr(backend, "__name__", repr(backend))
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a name or a callable, got {type(backend).__name__}")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"backend {backend!r} is not registered with torch.compile "
            f"(torch._dynamo.list_backends() has: {', '.join(known)})"
        )
    try:  # an installed entry point whose module is missing fails only here
        torch._dynamo.lookup_backend(backend)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"backend {backend!r} is registered but cannot be loaded: "
                         f"{type(e).__name__}: {e}") from None
    return backend


def inspect_model(
    model_or_fn: Callable[..., Any],
    example_inputs,
    *,
    options: dict | None = None,
    backend: str | Callable = "compile_norm",
    code: bool = False,
    bench: bool = False,
    out_dir: str | None = None,
    depyf: bool = False,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    repeats: int = 20,
    title: str | None = None,
    dynamic: bool = False,
    train: bool = False,
) -> InspectReport:
    """Compile ``model_or_fn`` with ``backend`` and report what every pass stage did.

    Runs the model eagerly and compiled (under ``torch.no_grad``) on ``example_inputs`` (a tensor
    or a tuple of positional arguments), records the post-grad graph before and after each pass
    via ``compile_norm.passes.base.observe_stages``, the generated kernels (their source with
    ``code=True``), the numerical difference per output, and with ``bench=True`` the time per
    call against stock ``torch.compile``. ``out_dir`` writes the stage graphs, report.json and
    report.html there; ``depyf=True`` (needs ``out_dir``) adds a depyf dump in ``out_dir/depyf``.
    ``dynamic=True`` compiles with symbolic shapes, as a model serving many sequence lengths is.

    ``train=True`` inspects a training step instead: a module in train mode (its modes are
    restored afterwards), grad mode on, the loss taken from the output (``training.loss_of``),
    ``loss.backward()``, eagerly and compiled. The report then holds the pre-grad pass's graph,
    the forward and the backward graph AOTAutograd hands Inductor, each with its stages, and
    ``report.train``: the loss and every parameter group's gradient against eager. ``bench``
    then times the whole step.
    """
    if not callable(model_or_fn):
        raise ValueError(f"model_or_fn must be callable, got {type(model_or_fn).__name__}")
    inputs = _as_inputs(example_inputs)
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    if depyf and not out_dir:
        raise ValueError("depyf=True needs out_dir (the dump is written to out_dir/depyf)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(dynamic, bool):
        raise ValueError(f"dynamic must be a bool (torch.compile's dynamic=True or False), got {dynamic!r}")
    if not isinstance(train, bool):
        raise ValueError(f"train must be a bool (True: inspect a training step), got {train!r}")
    backend_name = _check_backend(backend)
    if backend_name == "compile_norm":
        parse_options(options)  # a typo is found before the compile, with the option's name
    device = _device_of(model_or_fn, inputs)
    report = InspectReport(
        title=title or _title(model_or_fn),
        backend=backend_name, options=dict(options or {}), device=device,
        torch_version=torch.__version__, code_included=code, dynamic=dynamic,
    )
    params = training.trainable(model_or_fn, inputs, report.title) if train else []

    def compile_with(b, opts):
        kwargs = {"backend": b, "dynamic": dynamic}
        if opts:
            kwargs["options"] = opts
        return torch.compile(model_or_fn, **kwargs)

    def run(fn):
        """One call of ``fn`` (the model, or a compile of it): its output, or with ``train``
        its training step (``training.StepResult``)."""
        if train:
            return training.step(fn, inputs, params, report.title)
        return fn(*_clone(inputs))

    recorder = StageRecorder()
    before = dict(counters[COUNTER_GROUP])
    with _train_mode(model_or_fn, train), torch.enable_grad() if train else torch.no_grad():
        report.warnings.extend(_train_warnings(model_or_fn) if train else ())
        eager = run(model_or_fn)  # a target that cannot train fails here, before any compile
        torch._dynamo.reset()
        compiled = compile_with(backend, options)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_no_caches())
            stack.enter_context(observe_stages(recorder))
            got, codes, owners = _run_and_get_code(lambda: run(compiled), recorder)
        after = counters[COUNTER_GROUP]
        report.counters = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        report.graphs = recorder.graphs
        report.warnings.extend(recorder.problems)
        if not recorder.graphs:
            report.warnings.append(
                "no pass stage was observed: the backend did not call "
                "compile_norm.passes.base.notify_stage (or a compile cache skipped the passes)"
            )
        report.kernels, report.calls = kernels_mod.parse(codes, with_source=code, owners=owners)
        if train:
            report.train = training.compare(got, eager, len(eager.grads), tolerances)
            got, eager = got.out, eager.out
        report.numerics = numerics.compare(got, eager, tolerances)
        if bench:
            def call(fn):  # inference: the call alone, as the user makes it
                return (lambda: run(fn)) if train else (lambda: fn(*inputs))

            report.bench = _bench(model_or_fn, compiled, compile_with, call, device, repeats,
                                  "training step (forward + backward)" if train else "call")
        if depyf:
            report.depyf_dir = os.path.join(out_dir, "depyf")
            _depyf_dump(report.depyf_dir, lambda: run(compile_with(backend, options)))
    if out_dir:
        report.write(out_dir)
    return report


@contextlib.contextmanager
def _train_mode(model, train: bool):
    """With ``train``, a module in train mode for the block, every submodule's mode restored
    after it."""
    if not (train and isinstance(model, torch.nn.Module)):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
             torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _train_warnings(model) -> list[str]:
    if not isinstance(model, torch.nn.Module):
        return []
    drop = [n for n, m in model.named_modules() if isinstance(m, _DROPOUTS) and m.p > 0]
    if not drop:
        return []
    return [f"dropout is active in train mode ({', '.join(drop[:3])}{', ...' if len(drop) > 3 else ''}): "
            "compiled and eager code draw different random numbers, so their outputs and "
            "gradients differ by more than rounding"]


def _run_and_get_code(fn, recorder: StageRecorder):
    """``fn()``, the output code Inductor generated meanwhile, and for each module the graph
    it belongs to (``StageRecorder.compiling``). torch's ``run_and_get_code`` with the owner
    added: a training step compiles a forward and a backward module."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    owners: list[int | None] = []

    def save_output_code(code: str) -> None:
        if recorder.other_thread():  # a measurement's candidate, not the model's code
            return
        if code not in codes:
            codes.append(code)
            owners.append(recorder.compiling())

    with mock.patch.object(GraphLowering, "save_output_code", save_output_code):
        torch._dynamo.reset()
        result = fn()
    return result, codes, owners


def _depyf_dump(path, run_compiled) -> None:
    # A compile of its own, last: code compiled after prepare_debug ran is slowed down by it.
    import depyf as depyf_mod

    torch._dynamo.reset()
    with _no_caches(), depyf_mod.prepare_debug(path):
        run_compiled()
    torch._dynamo.reset()


def _bench(model, compiled, compile_with, call, device, repeats, what) -> bench_mod.Bench:
    """``call(fn)``: the zero-argument callable timed for ``fn`` (the model, a compile of it)."""
    # a compile of its own: Dynamo's cache entries are per backend, so the backend's stays
    stock = compile_with("inductor", None)
    call(stock)()
    fns = {"backend": call(compiled), "stock": call(stock), "eager": call(model)}
    inner = bench_mod.calls_per_repeat(fns["backend"], device)
    stats = {name: bench_mod.median_and_spread(times)
             for name, times in bench_mod.interleaved_us(fns, device, repeats, inner).items()}
    return bench_mod.Bench(device, repeats, inner, stats["backend"][0], stats["stock"][0],
                           stats["eager"][0], spread={name: s for name, (_, s) in stats.items()},
                           what=what)
