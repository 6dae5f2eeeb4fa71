"""Keep a narrowing float cast that torch 2.11's Inductor would fold away.

Model code often rounds to bf16 and widens again: Qwen3-Next's gated norm ends in
``.to(x.dtype)`` and the FP8 quantizer after it starts with ``.float()``; Gemma's norm ends in
``.type_as(x)`` before a quantizer does the same. Eager rounds there. Torch 2.11's joint-graph
pattern ``pointless_convert`` replaces every chain ``convert(convert(a, d1), d2)`` of float
dtypes by ``convert(a, d2)``, dropping the round even when ``d1`` is the narrower dtype
(pytorch#179561, fixed in 2.12 by #180575). The graph the passes see then computes something
eager does not, so nothing fuses there, and stock compile differs from eager as well.

Where the installed Inductor folds such chains (``FOLDS_NARROWING_CASTS``), the backend
installs ``KeepNarrowingCasts`` as Inductor's ``joint_custom_pre_pass``, which runs before the
joint-graph patterns. It respells the narrowing cast of each such chain as
``aten._to_copy(a, dtype=d1)``, which the pattern does not match and Inductor lowers the same
way. The pass manager's first step, ``restore``, turns those back into
``prims.convert_element_type`` so the fusion patterns see the graph in its usual form. The
same chains keep their round on 2.12+ by themselves, where nothing is installed.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.torch_version import TorchVersion

from . import patterns as P

aten, prims = torch.ops.aten, torch.ops.prims
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KEPT = "compile_norm_kept_cast"  # node.meta key of a respelled cast
FOLDS_NARROWING_CASTS = TorchVersion(torch.__version__) < (2, 12)


def _float_cast(node) -> torch.dtype | None:
    """The target dtype of ``prims.convert_element_type(a, float dtype)``, else None."""
    if isinstance(node, torch.fx.Node) and node.target is prims.convert_element_type.default \
            and node.args[1] in _FLOATS:
        return node.args[1]
    return None


def keep_narrowing_casts(graph: torch.fx.Graph) -> int:
    """Respell each float cast that narrows between two wider ones; returns how many."""
    kept = 0
    for node in list(graph.find_nodes(op="call_function", target=prims.convert_element_type.default)):
        narrow = _float_cast(node)
        source = P.val(node.args[0])
        if narrow is None or not isinstance(source, torch.Tensor) or source.dtype not in _FLOATS:
            continue
        if not any((_float_cast(u) or narrow).itemsize > narrow.itemsize for u in node.users):
            continue  # no user widens it again: nothing for the pattern to fold
        with graph.inserting_before(node):
            copy = graph.call_function(aten._to_copy.default, (node.args[0],), {"dtype": narrow})
        copy.meta.update(node.meta)
        copy.meta[_KEPT] = True
        node.replace_all_uses_with(copy)
        graph.erase_node(node)
        kept += 1
    return kept


def restore(graph: torch.fx.Graph) -> None:
    """Turn the casts ``keep_narrowing_casts`` respelled back into ``convert_element_type``."""
    for node in list(graph.find_nodes(op="call_function", target=aten._to_copy.default)):
        if not node.meta.get(_KEPT):
            continue
        with graph.inserting_before(node):
            cast = graph.call_function(prims.convert_element_type.default,
                                       (node.args[0], node.kwargs["dtype"]))
        cast.meta.update({k: v for k, v in node.meta.items() if k != _KEPT})
        node.replace_all_uses_with(cast)
        graph.erase_node(node)


class KeepNarrowingCasts(CustomGraphPass):
    """Inductor's ``joint_custom_pre_pass`` on torch versions that fold narrowing casts."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        keep_narrowing_casts(graph)

    def uuid(self) -> str:
        return "compile_norm.keep_narrowing_casts.1"
