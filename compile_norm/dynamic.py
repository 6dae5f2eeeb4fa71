"""A norm's ``eps`` under ``torch.compile(dynamic=True)``: specialized, as a constant.

With ``dynamic=True`` Dynamo makes every Python float it reads (a module's
``variance_epsilon``) a graph input: a 0-d float64 tensor whose ``.item()`` is a SymFloat,
which AOTAutograd then turns into tensor arithmetic ("tensorify"). The norm then reads
``mean(x**2) + eps_tensor`` and no pass can give the ops, whose ``eps`` is a ``float``, that
value. The value is a constant in practice, so the backend asks Dynamo to specialize exactly
those floats, the way Dynamo itself specializes a float it cannot keep symbolic: it names the
float's symbol in ``TensorifyState`` and raises ``TensorifyScalarRestartAnalysis`` before
anything is compiled; Dynamo re-traces the frame once with the float as a constant under an
equality guard (a changed eps recompiles, as under ``dynamic=False``). Other floats (a
softmax scale, a dropout rate) stay symbolic.

An eps is recognized in Dynamo's graph as the canonicalize pass recognizes it later:
``rsqrt(v + eps)`` or ``(v + eps) ** -0.5``. Where this torch lacks the hooks, nothing
happens and the canonicalize pass reports the site ("eps is a tensor").
"""

from __future__ import annotations

import logging
import operator

import torch

log = logging.getLogger("compile_norm.passes")

try:  # private Dynamo hooks (torch >= 2.6); see docs/architecture.md, "Private APIs"
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState
except ImportError:  # pragma: no cover - older torch: the pass reports the site instead
    TensorifyScalarRestartAnalysis = TensorifyState = None

_ADDS = (operator.add, operator.iadd, torch.add)
_RSQRTS = (torch.rsqrt,)
_POWS = (operator.pow, torch.pow)


def _is(node: torch.fx.Node, functions: tuple, method: str) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in (method, f"__{method}__", f"{method}_")


def _is_rsqrt_of(node: torch.fx.Node, v: torch.fx.Node) -> bool:
    if _is(node, _RSQRTS, "rsqrt"):
        return node.args[0] is v
    return _is(node, _POWS, "pow") and node.args[0] is v and node.args[1:2] == (-0.5,)


def _is_eps(item: torch.fx.Node) -> bool:
    """``item`` (a float's value) is added to a tensor whose reciprocal root is taken."""
    return any(
        _is(add, _ADDS, "add") and any(_is_rsqrt_of(u, add) for u in add.users)
        for add in item.users
    )


def _float_symbol(placeholder: torch.fx.Node) -> str | None:
    """The SymFloat symbol of a float graph input (a 0-d float64 tensor Dynamo made of it)."""
    value = placeholder.meta.get("example_value")
    memo = getattr(value, "item_memo", None)
    expr = getattr(getattr(memo, "node", None), "_expr", None)
    return getattr(expr, "name", None)


def eps_symbols(gm: torch.fx.GraphModule) -> list[str]:
    """Symbols of the float graph inputs of Dynamo's graph ``gm`` that are a norm's eps."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        symbol = _float_symbol(node)
        if symbol is None:
            continue
        items = [u for u in node.users if u.op == "call_method" and u.target == "item"]
        if any(_is_eps(item) for item in items):
            found.append(symbol)
    return found


def specialize_eps(gm: torch.fx.GraphModule) -> None:
    """Restart Dynamo's analysis with every norm eps of ``gm`` a constant (once per float:
    after the restart the inputs are gone, so this returns without raising)."""
    if TensorifyState is None:
        return
    todo = [s for s in eps_symbols(gm) if not TensorifyState.should_specialize(s)]
    if not todo:
        return
    for symbol in todo:
        TensorifyState.specialize(symbol)
    log.info("compile_norm: specializing %d norm eps input(s) (%s) made symbolic by dynamic "
             "shapes; Dynamo re-traces with them as constants", len(todo), ", ".join(todo))
    raise TensorifyScalarRestartAnalysis


__all__ = ["eps_symbols", "specialize_eps"]
