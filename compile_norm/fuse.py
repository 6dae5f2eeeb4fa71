"""``compile_norm.fuse``: torch.compile with the compile_norm backend, as a function or decorator.

    model = compile_norm.fuse(model)                     # an nn.Module instance
    @compile_norm.fuse(options={"lowering": "kernel"})   # a function or an nn.Module class
    def f(x): ...

Keyword arguments are torch.compile's (``dynamic``, ``fullgraph``, ``mode``, ``options``,
``disable``); ``options`` are validated here, before anything is traced.

Every instance of a module class shares one ``forward`` code object, and Dynamo keeps one
cache per code object, limited to ``recompile_limit`` (8) entries. A model with hundreds of
fused norm instances of several hidden sizes would hit that limit (each size a graph: Dynamo
takes parameter shapes as static) and run the rest eagerly, unfused. So under automatic
dynamic shapes (``dynamic`` not given) a fused module is traced with
``force_parameter_static_shapes=False``: a weight whose shape changes from one call of the
frame to the next becomes dynamic like any input, and one graph serves every hidden size.
A model's own parameters never change shape between calls, so nothing else changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .options import parse_options

BACKEND = "compile_norm"


def _compile(target: Any, kwargs: dict[str, Any]) -> Any:
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        cls = target

        class Fused(cls):  # every instance is compiled in place on construction
            def __init__(self, *args: Any, **init_kwargs: Any) -> None:
                super().__init__(*args, **init_kwargs)
                compiled = torch.compile(self._call_impl, backend=BACKEND, **kwargs)
                self._compiled_call_impl = _shared_frame(compiled, kwargs)

        Fused.__name__ = cls.__name__
        Fused.__qualname__ = cls.__qualname__
        Fused.__module__ = cls.__module__
        Fused.__doc__ = cls.__doc__
        return Fused
    if isinstance(target, torch.nn.Module):
        compiled = torch.compile(target, backend=BACKEND, **kwargs)
        compiled.forward = _shared_frame(compiled.forward, kwargs)
        return compiled
    if callable(target):
        return torch.compile(target, backend=BACKEND, **kwargs)
    raise ValueError(f"compile_norm.fuse: target must be an nn.Module, a Module class or a function, got {type(target).__name__}")


def _shared_frame(compiled: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``compiled``, traced with parameter shapes allowed to vary (see the module docstring)
    under automatic dynamic shapes; as is under ``dynamic=True`` (every parameter dimension
    symbolic would slow the whole model) or ``dynamic=False``."""
    if kwargs.get("dynamic") is not None:
        return compiled
    # torch.compile's own low-overhead patcher (how it applies ``dynamic``), ~2 us a call
    patch = torch._dynamo.config._make_closure_patcher(force_parameter_static_shapes=False)

    @functools.wraps(compiled)
    def call(*args: Any, **call_kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # inside an outer compile: it traces the module
            return compiled(*args, **call_kwargs)
        revert = patch()
        try:
            return compiled(*args, **call_kwargs)
        finally:
            revert()

    return call


def fuse(target: Any = None, /, **kwargs: Any) -> Any:
    """Compile ``target`` with the compile_norm backend; without ``target``, a decorator."""
    unknown = set(kwargs) - {"dynamic", "fullgraph", "mode", "options", "disable"}
    if unknown:
        raise ValueError(f"compile_norm.fuse: unknown argument(s) {sorted(unknown)}; expected torch.compile's dynamic, fullgraph, mode, options, disable")
    if kwargs.get("options") is not None:
        parse_options(kwargs["options"])  # fail early, with the option's name
    if target is None:
        return functools.partial(fuse, **kwargs)
    return _compile(target, kwargs)
