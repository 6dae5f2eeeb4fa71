"""How each IR op becomes code under Inductor.

Every ``torch.ops.compile_norm.*`` op's reference function is registered as an Inductor
decomposition, so plain ``torch.compile(backend="inductor")`` inlines it and generates fused
code (no opaque extern call). The ``compile_norm`` backend compiles with ``decomp_table()``,
which leaves our ops out, so its passes still see the IR nodes; its ``lower`` pass then inlines
the same references (``reference_for``) or keeps a kernel call.
"""

from __future__ import annotations

from typing import Any, Callable

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
    cached = getattr(decomposition.fast_random_decomps, "cache_clear", None)
    if cached is not None:  # some torch versions memoize the merged table
        cached()


def decomp_table() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table without the compile_norm ops (for our backend)."""
    from torch._inductor.decomposition import select_decomp_table

    ours = op_overloads()
    return {k: v for k, v in select_decomp_table().items() if k not in ours}


register_decompositions()
