"""Records every pass stage of every graph the backend compiles (observer of notify_stage)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..passes import pre_grad
from . import graphs
from .graphs import GraphSnapshot


LOWER_STAGE = "lower"  # the pass that turns IR nodes into code (passes.lower.LowerPass.name)
# the first stage of a graph: the post-grad manager's, or the pre-grad pass's (training)
INPUT_STAGES = ("input", pre_grad.INPUT_STAGE)
PRE_GRAD, FORWARD, BACKWARD = "pre-grad", "forward", "backward"  # GraphRecord.kind


@dataclass
class Site:
    """A compile_norm IR node a stage added (a fused site) or removed (e.g. lowered)."""

    stage: str
    node: str
    op: str
    source: str | None
    lowered_to: str | None = None  # lower stage: "generated" or "kernel" (PassResult.lowered)
    why: str | None = None  # why the lowering chose it


@dataclass
class Unmatched:
    stage: str
    site: str
    reason: str


@dataclass
class StageRecord:
    name: str
    graph: GraphSnapshot
    matched: int | None = None  # PassResult.matched; None for the "input" stage
    fused: list[Site] = field(default_factory=list)  # IR nodes this stage added
    removed_ir: list[Site] = field(default_factory=list)  # IR nodes this stage removed
    added: list[str] = field(default_factory=list)  # every node added (names)
    removed: list[str] = field(default_factory=list)  # every node removed (names)
    rewired: list[str] = field(default_factory=list)  # same node, new arguments
    unmatched: list[Unmatched] = field(default_factory=list)
    error: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired)

    @property
    def removed_as(self) -> str:
        """What became of the IR nodes this stage removed: the lower pass lowers them to code,
        a fusion pass absorbs them into the fused node it adds."""
        return "lowered" if self.name == LOWER_STAGE else "absorbed"


@dataclass
class GraphRecord:
    label: str  # "graph 0/0 (forward)"
    stages: list[StageRecord] = field(default_factory=list)
    # PRE_GRAD (a training graph before AOTAutograd), FORWARD (an inference graph too) or BACKWARD
    kind: str = FORWARD

    def pairs(self):
        """(before, after) stage pairs, one per pass."""
        return list(zip(self.stages, self.stages[1:]))

    def sites(self) -> list[Site]:
        """Every fused site once: the IR nodes the fusion passes added that are still in the
        graph they hand on (the lower pass's input); a node a later pass absorbed (an
        ``rms_norm`` the residual pass turned into ``fused_add_rms_norm``) is not a site."""
        fusion = [st for st in self.stages[1:] if st.name != LOWER_STAGE]
        if not fusion:
            return []
        final = fusion[-1].graph.by_name()
        return [s for st in fusion for s in st.fused if s.node in final]

    def ir_ops(self) -> dict[str, int]:
        """compile_norm op -> nodes of it in the graph the fusion passes hand on (the lower
        pass's input): fused here or arriving as ops (a training graph's forward from the
        pre-grad pass, its backward's ``rms_norm_backward`` from AOTAutograd)."""
        fusion = [st for st in self.stages if st.name != LOWER_STAGE]
        if not fusion:
            return {}
        return dict(Counter(graphs.op_short_name(n.target) for n in fusion[-1].graph.nodes if n.ir))

    def lowered(self) -> list[Site]:
        """The IR nodes the lower pass replaced, each with what it became and why."""
        return [s for st in self.stages if st.name == LOWER_STAGE for s in st.removed_ir]


def _compile_id() -> str | None:
    try:
        cid = torch._guards.CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001  (only a label; older/newer torch may differ)
        return None
    return str(cid) if cid is not None else None


def _graph_kind(stage: str, graph: torch.fx.Graph) -> str:
    if stage == pre_grad.INPUT_STAGE:
        return PRE_GRAD
    names = [n.name for n in graph.find_nodes(op="placeholder")]
    if any(n.startswith("tangents") for n in names):  # AOTAutograd's names for the grad_outputs
        return BACKWARD
    return FORWARD


def _replaced_sources(before: GraphSnapshot, after: GraphSnapshot) -> dict[str, str]:
    """Added node -> the source of the nodes it replaced (the last one with a stack trace in the
    same changed stretch), for IR nodes a pass created without copying the stack trace."""
    out = {}
    for removed, added in graphs.replaced_blocks(before, after):
        sources = [n.source for n in removed if n.source]
        if sources:
            for n in added:
                out[n.name] = sources[-1]
    return out


class StageRecorder:
    """``observer(stage, graph, result)`` for ``compile_norm.passes.base.observe_stages``."""

    def __init__(self) -> None:
        self.graphs: list[GraphRecord] = []
        self.problems: list[str] = []
        self._thread: int | None = None  # the thread whose compile the last stage belonged to

    def other_thread(self) -> bool:
        """Code generated now comes from a thread other than the one whose stages were seen:
        a lowering measurement's candidate (lowerings/measure.py compiles in a worker thread),
        not the model's code."""
        return self._thread is not None and self._thread != threading.get_ident()

    def compiling(self) -> int | None:
        """Index of the graph Inductor is generating code for: the last one staged (code is
        generated right after the passes, in the compile's thread), None if none."""
        if self.other_thread():
            return None
        for i in range(len(self.graphs) - 1, -1, -1):
            if self.graphs[i].kind != PRE_GRAD:  # pre-grad graphs are compiled as their forward
                return i
        return None

    def __call__(self, stage: str, graph: torch.fx.Graph, result=None) -> None:
        snap = graphs.snapshot(graph)
        self._thread = threading.get_ident()
        if stage in INPUT_STAGES or not self.graphs:
            if stage not in INPUT_STAGES:
                self.problems.append(f"stage {stage!r} came before any 'input' stage")
            cid = _compile_id()
            kind = _graph_kind(stage, graph)
            self.graphs.append(GraphRecord(f"graph {cid or len(self.graphs)} ({kind})", kind=kind))
        rec = self.graphs[-1]
        st = StageRecord(stage, snap)
        if result is not None:
            st.matched = result.matched
            st.error = result.error
            st.unmatched = [Unmatched(stage, str(s), str(r)) for s, r in result.unmatched]
        if rec.stages:
            before = rec.stages[-1].graph
            d = graphs.diff(before, snap)
            st.added, st.removed, st.rewired = d.added, d.removed, d.rewired
            after_nodes, before_nodes = snap.by_name(), before.by_name()
            fallback = _replaced_sources(before, snap)
            st.fused = [
                Site(stage, n, after_nodes[n].target, after_nodes[n].source or fallback.get(n))
                for n in d.added if after_nodes[n].ir
            ]
            lowered = {name: (how, why) for name, how, why in getattr(result, "lowered", ())}
            st.removed_ir = [
                Site(stage, n, before_nodes[n].target, before_nodes[n].source, *lowered.get(n, ()))
                for n in d.removed if before_nodes[n].ir
            ]
        rec.stages.append(st)
