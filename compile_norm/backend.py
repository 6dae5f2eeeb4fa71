"""The ``compile_norm`` torch.compile backend.

``torch.compile(model, backend="compile_norm", options={...})`` finds this function through
the ``torch_dynamo_backends`` entry point (no import needed) and calls it with the ``options``
dict (and ``mode``, if given). It compiles with Inductor inside ``lowerings.keep_ops()``, so
the compile_norm ops' decompositions decline for this compile only (a context variable: other
threads' compiles still inline them) and the passes see the IR ops, and installs the pass
manager as the post-grad custom pass (and, for graphs that need gradients, the pre-grad pass
that makes the norms ops before AOTAutograd differentiates them). Inductor config names in
``options`` pass through as config patches. Pass results that a compile cache brings back
instead of running the passes are published when the compile returns
(``passes/results_cache.py``), for a backward graph compiled later too (``_inner_compile``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import dynamic, lowerings
from .options import CompileOptions, parse_options
from .passes import cast_guard, results_cache
from .passes.manager import CompileNormPass
from .passes.pre_grad import PreGradPass


def config_patches(options: CompileOptions, mode: str | None = None) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(options.inductor_config)
    patches["post_grad_custom_post_pass"] = CompileNormPass(options)
    # training graphs: the norms become ops before AOTAutograd differentiates them
    patches["pre_grad_custom_pass"] = PreGradPass(options)
    if cast_guard.FOLDS_NARROWING_CASTS:  # torch 2.11: keep eager's round to bf16 (cast_guard.py)
        patches["joint_custom_pre_pass"] = cast_guard.KeepNarrowingCasts()
    return patches


def compile_norm_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | CompileOptions | None = None,
    mode: str | None = None,
) -> Any:
    """Compile ``gm`` with Inductor plus the compile_norm passes."""
    from torch._inductor.compile_fx import compile_fx

    opts = parse_options(options)
    dynamic.specialize_eps(gm)  # eps made a graph input by dynamic=True: re-trace it constant
    # the passes must see the IR ops; tracing runs in this thread
    with lowerings.keep_ops(), results_cache.replaying():  # an AOTAutograd cache hit
        return compile_fx(gm, example_inputs, inner_compile=_inner_compile,
                          config_patches=config_patches(opts, mode))


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    """Inductor's compile of one forward or backward graph (an FX graph cache hit or not)."""
    from torch._inductor.compile_fx import compile_fx_inner

    with results_cache.replaying():
        return compile_fx_inner(gm, example_inputs, **kwargs)
