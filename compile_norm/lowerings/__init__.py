"""How each IR op becomes code under Inductor.

Every ``torch.ops.compile_norm.*`` op gets an entry in Inductor's default decomposition table,
once, when that table is imported, so plain ``torch.compile(backend="inductor")`` inlines the
op's reference and generates fused code (no opaque extern call). The table is never changed
after that. The ``compile_norm`` backend compiles inside ``keep_ops()``, a context variable
(private to the thread / asyncio task) under which each entry declines by returning
``NotImplemented``, as Inductor's own decompositions do, so tracing records the op itself and
the passes see the IR nodes; the ``lower`` pass then inlines the same references
(``reference_for``) or keeps a kernel call. A compile in another thread is unaffected.

The backend cannot pass its own table to ``compile_fx`` instead: the FX graph cache would
bypass every graph (the table is part of the key and does not pickle).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.util
import sys
from typing import Any, Callable, Iterator

import torch

from ..ops import registry


def op_overloads() -> dict[Any, str]:
    """``{OpOverload: op name}`` for every declared compile_norm op."""
    ns = getattr(torch.ops, registry.NAMESPACE)
    return {getattr(ns, name).default: name for name in registry.ops()}


def reference_for(target: Any) -> Callable[..., Any] | None:
    name = op_overloads().get(target)
    return None if name is None else registry.ops()[name].reference


# True inside keep_ops(): the decompositions decline, so the compile_norm ops stay in the graph.
_KEEP_OPS: contextvars.ContextVar[bool] = contextvars.ContextVar("compile_norm_keep_ops", default=False)

# One table entry per op, made once: the entries' identity never changes after registration.
_ENTRIES: dict[Any, Callable[..., Any]] = {}


def _declining(reference: Callable[..., Any]) -> Callable[..., Any]:
    """``reference``, except that inside ``keep_ops()`` it returns ``NotImplemented`` (proxy
    tracing then records the op instead of its decomposition)."""

    @functools.wraps(reference)
    def decomposition(*args: Any, **kwargs: Any) -> Any:
        if _KEEP_OPS.get():
            return NotImplemented
        return reference(*args, **kwargs)

    return decomposition


def register_decompositions() -> None:
    """Add each op's declining reference to Inductor's default decomposition table (idempotent)."""
    from torch._inductor import decomposition

    added = False
    for overload, name in op_overloads().items():
        if overload not in _ENTRIES:
            _ENTRIES[overload] = _declining(registry.ops()[name].reference)
        entry = _ENTRIES[overload]
        if decomposition.decompositions.get(overload) is not entry:
            decomposition.decompositions[overload] = entry
            added = True
    if added:
        _clear_cache()


def register_fallbacks() -> None:
    """Lower IR nodes that still reach Inductor (``lowering="kernel"``, or a foreign post-grad
    pass that creates them) as calls of the op, dispatched to its providers at run time.

    Explicit because Inductor refuses an implicit fallback for an op with a decomposition.
    """
    from torch._inductor.lowering import lowerings, make_fallback

    for overload in op_overloads():
        if overload not in lowerings:
            make_fallback(overload, warn=False, override_decomp=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after module ``name`` is imported: ``import compile_norm``
    must not import Inductor (and with it triton) itself."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_then_register
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if module ``name`` is loaded, else right after it loads."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _clear_cache() -> None:
    """Drop the merged table that some torch versions memoize (``fast_random_decomps``), in
    case Inductor built it before our entries were added; it stays valid afterwards, since
    they never change."""
    from torch._inductor import decomposition

    cached = getattr(decomposition.fast_random_decomps, "cache_clear", None)
    if cached is not None:
        cached()


@contextlib.contextmanager
def keep_ops() -> Iterator[None]:
    """While inside, in this thread / task only, the compile_norm decompositions decline and
    tracing keeps the ops in the graph. Inductor's tables are not touched."""
    token = _KEEP_OPS.set(True)
    try:
        yield
    finally:
        _KEEP_OPS.reset(token)


when_imported("torch._inductor.decomposition", register_decompositions)
when_imported("torch._inductor.lowering", register_fallbacks)
