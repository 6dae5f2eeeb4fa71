"""How each IR op becomes code under Inductor.

Every ``torch.ops.compile_norm.*`` op's reference function is registered as an Inductor
decomposition, so plain ``torch.compile(backend="inductor")`` inlines it and generates fused
code (no opaque extern call). The ``compile_norm`` backend compiles inside ``keep_ops()``,
which leaves our ops out, so its passes still see the IR nodes; its ``lower`` pass then inlines
the same references (``reference_for``) or keeps a kernel call.

Passing a decomposition table to ``compile_fx`` would make the FX graph cache bypass every
graph (the table is part of the key and does not pickle), so ``keep_ops()`` instead takes our
entries out of Inductor's table while the backend compiles.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import threading
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


def register_decompositions() -> None:
    """Add each op's reference to Inductor's default decomposition table (idempotent)."""
    from torch._inductor import decomposition

    for overload, name in op_overloads().items():
        decomposition.decompositions[overload] = registry.ops()[name].reference
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
    from torch._inductor import decomposition

    cached = getattr(decomposition.fast_random_decomps, "cache_clear", None)
    if cached is not None:  # some torch versions memoize the merged table
        cached()


_LOCK = threading.RLock()


@contextlib.contextmanager
def keep_ops() -> Iterator[None]:
    """While inside, Inductor's decomposition table leaves the compile_norm ops intact.

    Held under a lock; a plain-Inductor compile racing in another thread meanwhile would
    see our ops as opaque calls (correct, only slower).
    """
    from torch._inductor import decomposition

    with _LOCK:
        removed = {op: decomposition.decompositions.pop(op) for op in op_overloads() if op in decomposition.decompositions}
        _clear_cache()
        try:
            yield
        finally:
            decomposition.decompositions.update(removed)
            _clear_cache()


when_imported("torch._inductor.decomposition", register_decompositions)
when_imported("torch._inductor.lowering", register_fallbacks)
