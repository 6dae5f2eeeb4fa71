"""``compile_norm.fuse``: torch.compile with the compile_norm backend, as a function or decorator.

    model = compile_norm.fuse(model)                     # an nn.Module instance
    @compile_norm.fuse(options={"lowering": "kernel"})   # a function or an nn.Module class
    def f(x): ...

Keyword arguments are torch.compile's (``dynamic``, ``fullgraph``, ``mode``, ``options``,
``disable``); ``options`` are validated here, before anything is traced.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .options import parse_options

BACKEND = "compile_norm"


def _compile(target: Any, kwargs: dict[str, Any]) -> Any:
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        cls = target

        class Fused(cls):  # every instance is compiled in place on construction
            def __init__(self, *args: Any, **init_kwargs: Any) -> None:
                super().__init__(*args, **init_kwargs)
                self.compile(backend=BACKEND, **kwargs)

        Fused.__name__ = cls.__name__
        Fused.__qualname__ = cls.__qualname__
        Fused.__module__ = cls.__module__
        Fused.__doc__ = cls.__doc__
        return Fused
    if isinstance(target, torch.nn.Module) or callable(target):
        return torch.compile(target, backend=BACKEND, **kwargs)
    raise ValueError(f"compile_norm.fuse: target must be an nn.Module, a Module class or a function, got {type(target).__name__}")


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
