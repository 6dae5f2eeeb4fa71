"""InspectReport: what one inspection found, as text, JSON, HTML or a folder of files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from .bench import Bench
from .kernels import Kernel
from .numerics import OutputCheck
from .record import LOWER_STAGE, PRE_GRAD, GraphRecord, Site, Unmatched
from .training import TrainStep


@dataclass(repr=False)  # the generated repr of every graph is tens of KB
class InspectReport:
    title: str
    backend: str
    options: dict
    device: str
    torch_version: str
    dynamic: bool = False  # compiled with dynamic=True (symbolic shapes)
    graphs: list[GraphRecord] = field(default_factory=list)
    kernels: list[Kernel] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # extern / fallback op calls
    code_included: bool = False
    numerics: list[OutputCheck] = field(default_factory=list)
    bench: Bench | None = None
    counters: dict[str, int] = field(default_factory=dict)  # this run's compile_norm counters
    warnings: list[str] = field(default_factory=list)
    depyf_dir: str | None = None
    train: TrainStep | None = None  # inspect_model(train=True): the step's loss and gradients

    # --- summaries ---------------------------------------------------------------------------

    @property
    def fused(self) -> list[Site]:
        """Every fused site once (``GraphRecord.sites``), over all graphs."""
        return [s for g in self.graphs for s in g.sites()]

    def rewrites(self) -> dict[str, int]:
        """Fusion stage -> IR nodes it added, over all graphs: the per-stage breakdown (a site
        canonicalized and then given its residual add counts once in each stage)."""
        out: dict[str, int] = {}
        for g in self.graphs:
            for st in g.stages[1:]:
                if st.fused and st.name != LOWER_STAGE:
                    out[st.name] = out.get(st.name, 0) + len(st.fused)
        return out

    def fused_summary(self) -> str:
        """``"5 (rewrites per stage: canonicalize 5, residual 4)"``."""
        stages = ", ".join(f"{name} {n}" for name, n in self.rewrites().items())
        return f"{len(self.fused)}" + (f" (rewrites per stage: {stages})" if stages else "")

    @property
    def unmatched(self) -> list[Unmatched]:
        return [u for g in self.graphs for st in g.stages for u in st.unmatched]

    @property
    def numerics_ok(self) -> bool:
        """Every output, and in a training step the loss and every gradient, within tolerance."""
        return all(c.ok for c in self.numerics) and (self.train is None or self.train.ok)

    def graph_kernels(self, index: int) -> list[Kernel]:
        """The kernels generated for ``self.graphs[index]``."""
        return [k for k in self.kernels if k.graph == index]

    def graph_summary(self, index: int) -> str:
        """What one graph holds at the lower pass and what each op became, for the training
        view: ``"compile_norm ops rms_norm_backward x3 -> generated x3 (why); 4 kernels"``."""
        g = self.graphs[index]
        ops = g.ir_ops()
        text = "compile_norm ops " + (", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
                                      if ops else "none")
        if g.kind == PRE_GRAD:
            canon = next((st for st in g.stages if st.name.endswith("canonicalize")), None)
            error = next((st.error for st in g.stages if st.error), None)
            if error:
                return f"{text}; left to the post-grad passes: {error}"
            if canon is None or not canon.matched:
                return f"{text}; no norm matched: Dynamo's graph kept"
            return (f"{text} ({canon.matched} norm site(s) matched): replaces Dynamo's graph, "
                    "AOTAutograd differentiates the ops")
        ways: dict[tuple[str, str], int] = {}  # (became, why) -> nodes
        for s in g.lowered():
            way = (s.lowered_to or "lowered", s.why or "")
            ways[way] = ways.get(way, 0) + 1
        if ways:
            text += " -> " + ", ".join(f"{how} x{n}" + (f" ({why})" if why else "")
                                       for (how, why), n in ways.items())
        return f"{text}; {len(self.graph_kernels(index))} kernel(s)"

    def fused_counts(self) -> dict[str, int]:
        """IR op -> how many fused sites are of it (over all graphs)."""
        out: dict[str, int] = {}
        for s in self.fused:
            out[s.op] = out.get(s.op, 0) + 1
        return out

    # --- renderings --------------------------------------------------------------------------

    def __str__(self) -> str:  # print(report): the console summary
        return self.to_text()

    def __repr__(self) -> str:
        return (f"<InspectReport {self.title!r}: {len(self.fused)} fused site(s), "
                f"{len(self.unmatched)} unfused, {len(self.kernels)} kernel(s), numerics "
                f"{'ok' if self.numerics_ok else 'FAIL'}>")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.bench is not None:
            d["bench"]["speedup"] = self.bench.speedup
        d["numerics_ok"] = self.numerics_ok
        if self.train is not None:  # per graph what the training view shows
            d["train"]["ok"] = self.train.ok
            d["train"]["graphs"] = [
                {"label": g.label, "kind": g.kind, "ir_ops": g.ir_ops(),
                 "lowered": [(s.node, s.lowered_to, s.why) for s in g.lowered()],
                 "kernels": len(self.graph_kernels(i)), "summary": self.graph_summary(i)}
                for i, g in enumerate(self.graphs)]
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_html(self) -> str:
        from .html import render

        return render(self)

    def to_text(self, graphs: bool = False) -> str:
        """A console summary; ``graphs=True`` adds every stage's graph."""
        out = [f"== {self.title}: backend {self.backend!r} on {self.device} "
               f"(torch {self.torch_version}{', dynamic shapes' if self.dynamic else ''})"]
        if self.options:
            out.append(f"options: {json.dumps(self.options)}")
        out.extend(f"warning: {w}" for w in self.warnings)
        for g in self.graphs:
            out.append(f"\n-- {g.label}: {len(g.stages[0].graph.nodes)} nodes in, "
                       f"{len(g.stages[-1].graph.nodes)} out")
            for st in g.stages[1:]:
                line = (f"  {st.name:14s} matched {st.matched if st.matched is not None else '-'}"
                        f", unmatched {len(st.unmatched)}, +{len(st.added)} -{len(st.removed)}"
                        f" nodes")
                if st.error:
                    line += f"  ERROR: {st.error}"
                out.append(line)
                for s in st.fused:
                    out.append(f"    fused   {s.node} = {s.op}  @ {s.source or 'source unknown'}")
                for s in st.removed_ir:
                    how = f" -> {s.lowered_to} ({s.why})" if s.lowered_to else ""
                    out.append(f"    {st.removed_as:8s} {s.node} = {s.op}{how}")
                for u in st.unmatched:
                    out.append(f"    unfused {u.site}: {u.reason}")
            if graphs:
                for st in g.stages:
                    out.append(f"\n   [{g.label} / {st.name}]")
                    out.append(st.graph.text())
        if self.train:
            out.extend(self._train_text())
        counts = self.fused_counts()
        out.append(f"\nfused sites: {self.fused_summary()}")
        out.append("fused: " + (", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
                                if counts else "nothing"))
        out.append(f"unfused sites: {len(self.unmatched)}")
        out.append(f"kernels: {len(self.kernels)}"
                   + (f" ({', '.join(k.name for k in self.kernels)})" if self.kernels else ""))
        if self.calls:
            out.append("library calls: " + ", ".join(f"{k} x{v}" for k, v in self.calls.items()))
        if self.code_included:
            for k in self.kernels:
                out.append(f"\n   [kernel {k.name} ({k.kind})]\n{k.source or ''}")
        for c in self.numerics:
            out.append(f"numerics {c.name} {c.dtype}{c.shape}: max abs {c.max_abs:.3g}, "
                       f"max rel {c.max_rel:.3g} (atol {c.atol:g}, rtol {c.rtol:g}) "
                       f"{'ok' if c.ok else 'FAIL'}{' ' + c.note if c.note else ''}")
        if self.bench:
            b = self.bench
            out.append(f"time per {b.what} ({b.device}, interleaved, median [25th-75th percentile] "
                       f"of {b.repeats}): backend {b.describe('backend', b.backend_us)}, stock "
                       f"torch.compile {b.describe('stock', b.stock_us)}, eager "
                       f"{b.describe('eager', b.eager_us)} -> {b.speedup:.2f}x vs stock")
            out.append(f"  ({b.expectation})")
        if self.counters:
            out.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))
        if self.depyf_dir:
            out.append(f"depyf dump: {self.depyf_dir}")
        return "\n".join(out)

    def _train_text(self) -> list[str]:
        t = self.train
        out = [f"\ntraining step: loss = {t.loss_rule}, then loss.backward() "
               f"({t.trainable} tensor(s) require grad)"]
        out.extend(f"  {g.label}: {self.graph_summary(i)}" for i, g in enumerate(self.graphs))
        c = t.loss
        out.append(f"  loss: eager {t.eager_loss:.6g}, compiled {t.compiled_loss:.6g}: max abs "
                   f"{c.max_abs:.3g}, max rel {c.max_rel:.3g} (atol {c.atol:g}, rtol {c.rtol:g}) "
                   f"{'ok' if c.ok else 'FAIL'}{' ' + c.note if c.note else ''}")
        out.append(f"  gradients: {t.summary()}")
        out.extend(f"    {g.group} ({g.dtype} x{g.params}): max abs {g.max_abs:.3g}, max rel "
                   f"{g.max_rel:.3g} {'ok' if g.ok else 'FAIL'}{' ' + g.note if g.note else ''}"
                   for g in t.grads)
        if t.no_grad:
            out.append(f"  no gradient, eager or compiled: {', '.join(t.no_grad)}")
        return out

    def write(self, out_dir: str) -> list[str]:
        """Stage graphs as text files, report.json, report.html, report.txt; returns the paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for gi, g in enumerate(self.graphs):
            for si, st in enumerate(g.stages):
                slug = re.sub(r"[^A-Za-z0-9]+", "_", st.name).strip("_")
                p = os.path.join(out_dir, f"graph{gi}_{si}_{slug}.txt")
                with open(p, "w") as f:
                    f.write(f"# {g.label}, stage {st.name}\n{st.graph.text()}\n")
                paths.append(p)
        for name, text in (("report.json", self.to_json()), ("report.html", self.to_html()),
                           ("report.txt", self.to_text(graphs=False))):
            p = os.path.join(out_dir, name)
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
            paths.append(p)
        return paths
