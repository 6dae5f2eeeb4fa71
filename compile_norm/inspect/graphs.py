"""Snapshots of a post-grad FX graph as text, and what changed between two snapshots.

The pass manager rewrites one graph in place, so each stage is copied to plain data the moment
it is observed: one line per node, with the node's shape/dtype and the model source line.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field

import torch

IR_NAMESPACE = "compile_norm"

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


@dataclass
class NodeInfo:
    name: str
    op: str  # placeholder, call_function, output, ...
    target: str  # "aten.mul.Tensor", "compile_norm.rms_norm.default", ...
    text: str  # the node as one readable line
    ir: bool  # a compile_norm IR op
    source: str | None = None  # "model.py:12 in forward: return x * w"

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.target)


@dataclass
class GraphSnapshot:
    nodes: list[NodeInfo] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(n.text for n in self.nodes)

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def source_line(stack_trace: str | None) -> str | None:
    """The innermost frame of an FX ``stack_trace`` as ``file.py:LINE in func: code``, followed by
    up to two calling frames (``(from file.py:LINE, ...)``): a norm class is called from many
    places, and the caller tells which one this is."""
    if not stack_trace:
        return None
    lines = stack_trace.rstrip().splitlines()
    frames = []
    for i, text in enumerate(lines):
        m = _FRAME.search(text)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.search(lines[i + 1]) else ""
            frames.append((f"{os.path.basename(m['file'])}:{m['line']}", m["func"], code))
    if not frames:
        return None
    where, func, code = frames[-1]
    out = f"{where} in {func}: {code}" if code else f"{where} in {func}"
    callers = [f for f, _, _ in reversed(frames[-3:-1])]
    return out + (f" (from {', '.join(callers)})" if callers else "")


def target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
        return f"{mod}.{name}" if mod and mod not in ("builtins", "_operator") else name
    return str(t)


def op_short_name(target: str) -> str:
    """``"compile_norm.rms_norm_backward.default"`` -> ``"rms_norm_backward"``."""
    parts = target.split(".")
    return parts[1] if len(parts) == 3 else target


def is_ir(node: torch.fx.Node) -> bool:
    t = node.target
    return isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and (
        t.namespace == IR_NAMESPACE
    )


_DTYPE_ABBR = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8", torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2",
}


def _meta_str(val) -> str:
    if isinstance(val, torch.Tensor):
        dt = _DTYPE_ABBR.get(val.dtype, str(val.dtype).replace("torch.", ""))
        return f"{dt}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_meta_str(v) for v in val) + ")"
    return ""


def _arg_str(a) -> str:
    if isinstance(a, torch.fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg_str(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg_str(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "torch.")
    return repr(a)


def node_line(node: torch.fx.Node) -> str:
    meta = _meta_str(node.meta.get("val"))
    head = f"{node.name}: {meta}" if meta else node.name
    if node.op == "placeholder":
        return f"{head} = input"
    if node.op == "output":
        return f"return {_arg_str(node.args[0])}"
    if node.op == "get_attr":
        return f"{head} = self.{node.target}"
    args = [_arg_str(a) for a in node.args]
    args += [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
    return f"{head} = {target_name(node)}({', '.join(args)})"


def snapshot(graph: torch.fx.Graph) -> GraphSnapshot:
    snap = GraphSnapshot()
    for node in graph.nodes:
        snap.nodes.append(
            NodeInfo(
                name=node.name,
                op=node.op,
                target=target_name(node) if node.op == "call_function" else node.op,
                text=node_line(node),
                ir=node.op == "call_function" and is_ir(node),
                source=source_line(node.meta.get("stack_trace")),
            )
        )
    return snap


@dataclass
class GraphDiff:
    added: list[str]  # node names only in the after graph (or whose target changed)
    removed: list[str]  # node names only in the before graph (or whose target changed)
    rewired: list[str]  # same name and target, different arguments


def diff(before: GraphSnapshot, after: GraphSnapshot) -> GraphDiff:
    b, a = before.by_name(), after.by_name()
    added = [n.name for n in after.nodes if n.name not in b or b[n.name].target != n.target]
    removed = [n.name for n in before.nodes if n.name not in a or a[n.name].target != n.target]
    rewired = [
        n.name for n in after.nodes
        if n.name in b and b[n.name].target == n.target and b[n.name].text != n.text
    ]
    return GraphDiff(added, removed, rewired)


def aligned_rows(before: GraphSnapshot, after: GraphSnapshot):
    """Rows ``(kind, before_node | None, after_node | None)`` lining both graphs up side by side.

    kind is "equal", "rewired", "removed", "added" or "changed" (a removed and an added node on
    the same row).
    """
    left = [n.key for n in before.nodes]
    right = [n.key for n in after.nodes]
    rows = []
    sm = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for bn, an in zip(before.nodes[i1:i2], after.nodes[j1:j2]):
                rows.append(("equal" if bn.text == an.text else "rewired", bn, an))
            continue
        bs, as_ = before.nodes[i1:i2], after.nodes[j1:j2]
        for k in range(max(len(bs), len(as_))):
            bn = bs[k] if k < len(bs) else None
            an = as_[k] if k < len(as_) else None
            rows.append(("changed" if bn and an else "removed" if bn else "added", bn, an))
    return rows


def replaced_blocks(before: GraphSnapshot, after: GraphSnapshot):
    """``(removed nodes, added nodes)`` for each stretch where the two graphs differ."""
    sm = difflib.SequenceMatcher(a=[n.key for n in before.nodes], b=[n.key for n in after.nodes],
                                 autojunk=False)
    return [(before.nodes[i1:i2], after.nodes[j1:j2])
            for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal"]
