"""Helpers shared by the passes: which node is which IR op, its arguments, building new nodes."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import registry
from ..ops.spec import Kind, OpSpec

aten = torch.ops.aten
prims = torch.ops.prims
NORM = "rms_norm"
ADD_NORM = "fused_add_rms_norm"
GATED = "rms_norm_gated"


def overload(name: str) -> Any:
    return registry.overload(name)


def spec_of(node: Any) -> OpSpec | None:
    """The spec of the compile_norm op a node calls, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    return registry.spec_of(node.target)


def op_name(node: Any) -> str | None:
    """The compile_norm op a node calls, or None."""
    spec = spec_of(node)
    return None if spec is None else spec.name


def norm_names() -> list[str]:
    """Every op that normalizes (plain, fused add, and their quant variants)."""
    return [s.name for s in registry.specs() if s.normalizes]


def has_residual(name: str) -> bool:
    return registry.spec(name).residual


def scheme_of(name: str) -> str | None:
    return registry.spec(name).scheme_name


def with_residual(name: str) -> str:
    """The op that also adds the residual: ``rms_norm_<s>`` -> ``fused_add_rms_norm_<s>``."""
    spec = registry.spec(name)
    kind = Kind.ADD_NORM_QUANT if spec.scheme is not None else Kind.ADD_NORM
    return registry.find(kind, spec.scheme_name).name


def with_scheme(name: str, scheme: str) -> str:
    """The norm op that also quantizes with ``scheme``."""
    spec = registry.spec(name)
    kind = (Kind.GATED_NORM_QUANT if spec.gated
            else Kind.ADD_NORM_QUANT if spec.residual else Kind.NORM_QUANT)
    return registry.find(kind, scheme).name


def norm_args(node: torch.fx.Node) -> list[Any]:
    """All arguments of a compile_norm node, positional, defaults filled in."""
    args, kwargs = registry.normalize_call(op_name(node), tuple(node.args), dict(node.kwargs))
    assert not kwargs, "compile_norm schemas have no keyword-only arguments"
    return list(args)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(
        statically_known_true(x == y) for x, y in zip(a.shape, b.shape)
    )


def _fake_mode(args: tuple) -> Any:
    from torch._guards import detect_fake_mode
    from torch._inductor.virtualized import NullHandler, V

    mode = detect_fake_mode([val(a) for a in args if isinstance(a, torch.fx.Node)])
    if mode is None and V.fake_mode is not None and not isinstance(V.fake_mode, NullHandler):
        mode = V.fake_mode
    return mode


def call(graph: torch.fx.Graph, target: Any, args: tuple) -> torch.fx.Node:
    """Insert ``target(*args)`` at the graph's insert point, with its fake value in meta."""
    node = graph.call_function(target, args)
    # nested too: a view's size list holds symbolic sizes as nodes under dynamic shapes
    fake_args = torch.fx.node.map_arg(args, val)
    mode = _fake_mode(args)
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args)
    return node


def getitem(graph: torch.fx.Graph, node: torch.fx.Node, index: int) -> torch.fx.Node:
    item = graph.call_function(operator.getitem, (node, index))
    if "val" in node.meta:
        item.meta["val"] = node.meta["val"][index]
    return item


def output_users(node: torch.fx.Node) -> dict[int, list[torch.fx.Node]]:
    """``{output index: getitem users}`` of a tuple-returning node."""
    result: dict[int, list[torch.fx.Node]] = {}
    for user in node.users:
        if user.target is operator.getitem:
            result.setdefault(user.args[1], []).append(user)
    return result


def is_multi_output(node: torch.fx.Node) -> bool:
    return isinstance(val(node), (tuple, list))


def site(node: torch.fx.Node) -> str:
    """A node's name and, where Dynamo recorded it, the model source line."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return f"{node.name} ({lines[-1]})" if lines else node.name


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
