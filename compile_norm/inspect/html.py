"""The HTML report: one self-contained page (inline CSS and JS, nothing fetched from a network)."""

from __future__ import annotations

import json
import re
from html import escape

from .graphs import GraphSnapshot, aligned_rows

CONTEXT = 3  # unchanged lines kept around a change; longer unchanged runs fold

_CSS = """
:root{--bg:#fbfbfa;--fg:#1d2330;--mut:#6b7280;--line:#e4e4e0;--card:#fff;
--add:#e3f6e8;--addb:#2f9e55;--rem:#fdecec;--remb:#d64545;--chg:#fff4d6;--chgb:#c98a00;
--rew:#f1f3f9;--ir:#3451b2;--mono:ui-monospace,"SFMono-Regular","JetBrains Mono",Menlo,Consolas,monospace}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 -apple-system,"Segoe UI",Inter,Roboto,"Helvetica Neue",Arial,sans-serif}
header{padding:28px 40px 18px;border-bottom:1px solid var(--line);background:var(--card)}
h1{margin:0 0 4px;font-size:24px;font-weight:650;letter-spacing:-.01em}
h2{font-size:18px;margin:34px 0 12px;font-weight:650}
h3{font-size:15px;margin:22px 0 8px;font-weight:600;color:#374151}
main{padding:0 40px 60px;max-width:1800px}
.meta{color:var(--mut);font-size:13px}
.meta code{font-family:var(--mono);font-size:12px}
nav a{margin-right:16px;color:var(--ir);text-decoration:none;font-size:14px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:18px 0 4px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 18px;min-width:150px}
.card .v{font-size:24px;font-weight:650}.card .k{color:var(--mut);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.good{color:#1d7f43}.bad{color:#c03030}
table.data{border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:8px;font-size:14px}
table.data th,table.data td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
table.data th{background:#f4f4f1;font-weight:600;font-size:13px}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:var(--mono);font-size:13px}
.tag{display:inline-block;padding:1px 8px;border-radius:99px;font-size:12px;font-weight:600}
.tag.fused{background:var(--add);color:#1d7f43}.tag.unfused{background:var(--rem);color:#b02a2a}
.tag.lowered{background:var(--rew);color:var(--ir)}
.tag.absorbed,.tag.rewritten{background:var(--rew);color:#6b6b6b}
.src{font-family:var(--mono);font-size:12.5px;color:#374151}
.legend{display:flex;gap:18px;flex-wrap:wrap;font-size:13px;color:var(--mut);margin:8px 0 14px}
.sw{display:inline-block;width:14px;height:14px;border-radius:3px;vertical-align:-2px;margin-right:6px;border-left:3px solid}
.sw.added{background:var(--add);border-color:var(--addb)}.sw.removed{background:var(--rem);border-color:var(--remb)}
.sw.changed{background:var(--chg);border-color:var(--chgb)}.sw.rewired{background:var(--rew);border-color:#9aa5c4}
.sw.ir{background:#fff;border-color:var(--ir)}
details.stage{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:10px 0;overflow:hidden}
details.stage>summary{cursor:pointer;padding:10px 16px;font-weight:600;list-style:none}
details.stage>summary::before{content:"\\25B8";display:inline-block;width:16px;color:var(--mut)}
details.stage[open]>summary::before{content:"\\25BE"}
summary .stat{font-weight:400;color:var(--mut);margin-left:10px;font-size:13px}
.diffwrap{overflow:auto;max-height:75vh;border-top:1px solid var(--line)}
table.diff{border-collapse:collapse;width:100%;table-layout:fixed;font-family:var(--mono);font-size:12.5px;line-height:1.55}
table.diff th{position:sticky;top:0;background:#f4f4f1;text-align:left;padding:6px 10px;font-family:inherit;font-size:12px;z-index:1}
table.diff td{padding:0 10px;white-space:pre;overflow:hidden;text-overflow:ellipsis;border-left:3px solid transparent;width:50%}
table.diff td:hover{white-space:pre-wrap;word-break:break-all}
td.removed{background:var(--rem);border-left-color:var(--remb)!important}
td.added{background:var(--add);border-left-color:var(--addb)!important}
td.changed{background:var(--chg);border-left-color:var(--chgb)!important}
td.rewired{background:var(--rew);border-left-color:#9aa5c4!important}
td.blank{background:repeating-linear-gradient(45deg,#fafafa,#fafafa 6px,#f2f2f0 6px,#f2f2f0 12px)}
tr.fold td{background:#f7f7f5;color:var(--mut);cursor:pointer;text-align:center;font-family:inherit;font-size:12px}
tr.hid{display:none}
.n{font-weight:600}.t{color:#8a8f98}.op{color:#7a3e9d}.irop{color:var(--ir);font-weight:700}
.fused .irop{text-decoration:underline;text-decoration-color:var(--addb)}
.reason{color:#8a2d2d}
pre.code{background:#1f2430;color:#e6e6e6;padding:14px 16px;border-radius:8px;overflow:auto;font-family:var(--mono);font-size:12.5px;max-height:60vh}
details.kernel{margin:6px 0}details.kernel>summary{cursor:pointer;font-family:var(--mono);font-size:13.5px}
.bar{height:10px;border-radius:5px;background:#9aa5c4;display:inline-block;vertical-align:middle}
.bar.me{background:var(--addb)}
.warn{background:var(--chg);border:1px solid #f0d48a;padding:10px 14px;border-radius:8px;margin:14px 0}
"""

_JS = """
document.querySelectorAll('tr.fold').forEach(function(r){r.addEventListener('click',function(){
  var id=r.dataset.fold;document.querySelectorAll('tr[data-in="'+id+'"]').forEach(function(x){x.classList.toggle('hid')});
  r.remove();});});
"""

_LINE = re.compile(r"^(?P<name>[\w.]+)(?P<type>: [^=]*?)? = (?P<target>[\w.]+)(?P<rest>.*)$")


def _node_html(text: str, ir: bool) -> str:
    m = _LINE.match(text)
    if not m:
        return escape(text)
    cls = "irop" if ir else "op"
    return (f'<span class="n">{escape(m["name"])}</span>'
            f'<span class="t">{escape(m["type"] or "")}</span> = '
            f'<span class="{cls}">{escape(m["target"])}</span>{escape(m["rest"])}')


def _cell(node, kind: str, side: str, fused: set[str]) -> str:
    if node is None:
        return '<td class="blank"></td>'
    cls = {"equal": "", "rewired": "rewired", "changed": "changed"}.get(kind, kind)
    if kind == "changed":
        cls = "removed" if side == "l" else "added"
    extra = " fused" if side == "r" and node.name in fused else ""
    ir = " ir" if node.ir else ""
    title = escape(node.source or "", quote=True)
    return (f'<td class="{cls}{extra}{ir}" data-node="{escape(node.name, quote=True)}" '
            f'title="{title}">{_node_html(node.text, node.ir)}</td>')


def _diff_table(before: GraphSnapshot, after: GraphSnapshot, bname: str, aname: str,
                fused: set[str], fold_prefix: str) -> str:
    rows = aligned_rows(before, after)
    changed = [i for i, (k, _, _) in enumerate(rows) if k != "equal"]
    keep = set()
    for i in changed:
        keep.update(range(max(0, i - CONTEXT), i + CONTEXT + 1))
    out = [f'<table class="diff"><thead><tr><th>before: {escape(bname)}</th>'
           f'<th>after: {escape(aname)}</th></tr></thead><tbody>']
    i, nfold = 0, 0
    while i < len(rows):
        if i in keep or not changed:
            k, b, a = rows[i]
            out.append(f"<tr>{_cell(b, k, 'l', fused)}{_cell(a, k, 'r', fused)}</tr>")
            i += 1
            continue
        j = i
        while j < len(rows) and j not in keep:
            j += 1
        fid = f"{fold_prefix}-{nfold}"
        nfold += 1
        out.append(f'<tr class="fold" data-fold="{fid}"><td colspan="2">&#8943; {j - i} unchanged '
                   f'nodes (click to show)</td></tr>')
        for k, b, a in rows[i:j]:
            out.append(f'<tr class="hid" data-in="{fid}">{_cell(b, k, "l", fused)}'
                       f'{_cell(a, k, "r", fused)}</tr>')
        i = j
    out.append("</tbody></table>")
    return "".join(out)


def _stages_html(report) -> str:
    out = []
    for gi, g in enumerate(report.graphs):
        out.append(f"<h3>{escape(g.label)} &middot; {len(g.stages[0].graph.nodes)} nodes in, "
                   f"{len(g.stages[-1].graph.nodes)} out</h3>")
        for si, (b, a) in enumerate(g.pairs()):
            stat = (f"matched {a.matched if a.matched is not None else '-'} &middot; unmatched "
                    f"{len(a.unmatched)} &middot; +{len(a.added)} / &minus;{len(a.removed)} nodes")
            if a.error:
                stat += f' &middot; <span class="bad">error: {escape(a.error)}</span>'
            if not a.changed:
                stat += " &middot; no change"
            opened = " open" if a.changed else ""
            out.append(f'<details class="stage" id="g{gi}s{si}"{opened}><summary>{escape(a.name)}'
                       f'<span class="stat">{stat}</span></summary>')
            if a.unmatched:
                out.append('<div style="padding:4px 16px 10px">' + "<br>".join(
                    f'<span class="tag unfused">unfused</span> <code>{escape(u.site)}</code>: '
                    f'<span class="reason">{escape(u.reason)}</span>' for u in a.unmatched)
                    + "</div>")
            fused = {s.node for s in a.fused}
            out.append('<div class="diffwrap">' + _diff_table(
                b.graph, a.graph, b.name, a.name, fused, f"g{gi}s{si}") + "</div></details>")
    return "".join(out)


def _sites_html(report) -> str:
    rows = []
    for g in report.graphs:
        sites = {s.node for s in g.sites()}
        for st in g.stages:
            for s in st.fused:  # a node a later pass fused further is a step, not a site
                tag = "fused" if s.node in sites else "rewritten"
                rows.append((tag, st.name, g.label, f"{s.node} = {s.op}", s.source or "", ""))
            for s in st.removed_ir:
                how = f" \u2192 {s.lowered_to} ({s.why})" if s.lowered_to else ""
                rows.append((st.removed_as, st.name, g.label, f"{s.node} = {s.op}{how}",
                             s.source or "", ""))
            for u in st.unmatched:
                rows.append(("unfused", st.name, g.label, u.site, "", u.reason))
    if not rows:
        return "<p>No site was fused and none was reported unmatched.</p>"
    body = "".join(
        f'<tr><td><span class="tag {t}">{t}</span></td><td>{escape(st)}</td><td>{escape(gl)}</td>'
        f'<td class="src">{escape(node)}</td><td class="src">{escape(src)}</td>'
        f'<td class="reason">{escape(reason)}</td></tr>'
        for t, st, gl, node, src, reason in rows)
    return ('<table class="data"><thead><tr><th>site</th><th>stage</th><th>graph</th><th>node</th>'
            f'<th>model source</th><th>reason left unfused</th></tr></thead><tbody>{body}</tbody></table>')


def _kernels_html(report) -> str:
    if not report.kernels:
        out = ["<p>No generated kernel was found in the output code.</p>"]
    else:
        out = []
        for k in report.kernels:
            graph = f", {report.graphs[k.graph].label}" if k.graph is not None else ""
            head = (f'<code>{escape(k.name)}</code> <span class="meta">{escape(k.kind)}, module '
                    f'{k.module}{escape(graph)}</span>')
            if k.source is not None:
                out.append(f'<details class="kernel"><summary>{head}</summary>'
                           f'<pre class="code">{escape(k.source)}</pre></details>')
            else:
                out.append(f'<div class="kernel">{head}</div>')
        if not report.code_included:
            out.append('<p class="meta">Kernel sources are left out; run with <code>--code</code> '
                       '(<code>code=True</code>) to include them.</p>')
    if report.calls:
        body = "".join(f'<tr><td class="src">{escape(c)}</td><td class="num">{n}</td></tr>'
                       for c, n in report.calls.items())
        out.append('<h3>Library and fallback calls</h3><table class="data"><thead><tr><th>call'
                   f'</th><th>count</th></tr></thead><tbody>{body}</tbody></table>')
    return "".join(out)


def _numerics_html(report) -> str:
    if not report.numerics:
        return "<p>No output to compare.</p>"
    body = "".join(
        f'<tr><td class="src">{escape(c.name)}</td><td>{escape(c.dtype)}</td>'
        f'<td class="src">{escape(str(c.shape))}</td><td class="num">{c.max_abs:.3g}</td>'
        f'<td class="num">{c.max_rel:.3g}</td><td class="num">{c.atol:g}</td>'
        f'<td class="num">{c.rtol:g}</td>{_verdict(c.ok, c.note)}</tr>'
        for c in report.numerics)
    return ('<p class="meta">Compiled against eager on the same inputs; an element passes when '
            '|compiled &minus; eager| &le; atol + rtol &middot; |eager|. Relative error is taken '
            'over elements with |eager| &gt; atol.</p><table class="data"><thead><tr><th>output'
            '</th><th>dtype</th><th>shape</th><th>max abs</th><th>max rel</th><th>atol</th><th>'
            f'rtol</th><th>result</th><th></th></tr></thead><tbody>{body}</tbody></table>')


def _bench_html(report) -> str:
    b = report.bench
    if b is None:
        return ('<p class="meta">Not measured; run with <code>--bench</code> '
                '(<code>bench=True</code>).</p>')
    top = max(b.backend_us, b.stock_us, b.eager_us) or 1.0
    rows = "".join(
        f'<tr><td>{label}</td><td class="num">{us:.1f}</td><td class="num">{spread}</td>'
        f'<td><span class="bar{me}" style="width:{max(2, 320 * us / top):.0f}px"></span></td></tr>'
        for label, us, spread, me in (
            (f"torch.compile backend={escape(report.backend)}", b.backend_us, _spread(b, "backend"), " me"),
            ("stock torch.compile (inductor)", b.stock_us, _spread(b, "stock"), ""),
            ("eager", b.eager_us, _spread(b, "eager"), "")))
    cls = "good" if b.speedup >= 1 else "bad"
    return (f'<p><span class="{cls}" style="font-size:20px;font-weight:650">{b.speedup:.2f}&times;'
            f'</span> against stock torch.compile &middot; <span class="meta">{escape(b.device)}, '
            f'wall clock per {escape(b.what)}, candidates interleaved, median of {b.repeats} repeats of '
            f'{b.calls_per_repeat} calls{", synchronized" if b.device.startswith("cuda") else ""}'
            f'</span></p><p class="meta">{escape(b.expectation)}</p>'
            '<table class="data"><thead><tr><th>candidate</th><th>&micro;s (median)</th>'
            f'<th>25th&ndash;75th percentile</th><th></th></tr></thead><tbody>{rows}</tbody></table>')


def _train_html(report) -> str:
    t = report.train
    rows = "".join(
        f'<tr><td>{escape(g.label)}</td><td class="src">{escape(report.graph_summary(i))}</td></tr>'
        for i, g in enumerate(report.graphs))
    c = t.loss
    loss = (f'<table class="data"><thead><tr><th>loss</th><th>eager</th><th>compiled</th><th>max abs'
            f'</th><th>max rel</th><th>atol</th><th>rtol</th><th>result</th><th></th></tr></thead><tbody><tr>'
            f'<td>{escape(t.loss_rule)}</td><td class="num">{t.eager_loss:.6g}</td><td class="num">'
            f'{t.compiled_loss:.6g}</td><td class="num">{c.max_abs:.3g}</td><td class="num">'
            f'{c.max_rel:.3g}</td><td class="num">{c.atol:g}</td><td class="num">{c.rtol:g}</td>'
            f'{_verdict(c.ok, c.note)}</tr></tbody></table>')
    grads = "".join(
        f'<tr><td class="src">{escape(g.group)}</td><td>{escape(g.dtype)}</td><td class="num">'
        f'{g.params}</td><td class="num">{g.max_abs:.3g}</td><td class="num">{g.max_rel:.3g}</td>'
        f'<td class="num">{g.rtol:g}</td>{_verdict(g.ok, g.note)}</tr>' for g in t.grads)
    no_grad = (f'<p class="meta">No gradient, eager or compiled: <code>'
               f'{escape(", ".join(t.no_grad))}</code></p>' if t.no_grad else "")
    return (f'<p>One step: loss = {escape(t.loss_rule)}, then <code>loss.backward()</code>, eagerly '
            f'and compiled; {t.trainable} tensor(s) require grad. The pre-grad pass makes the '
            'norms ops before AOTAutograd splits the graph into the forward and the backward '
            'Inductor compiles.</p><h3>Graphs</h3><table class="data"><thead><tr><th>graph</th>'
            f'<th>compile_norm ops at the lower pass, what they became, kernels</th></tr></thead>'
            f'<tbody>{rows}</tbody></table><h3>Loss</h3>{loss}<h3>Gradients: '
            f'{escape(t.summary())}</h3><p class="meta">Per parameter group (layer indices as '
            '<code>*</code>): max |compiled &minus; eager| / max |eager| over the group\'s '
            'gradients, against the dtype\'s rtol.</p><table class="data"><thead><tr><th>group'
            '</th><th>dtype</th><th>tensors</th><th>max abs</th><th>max rel</th><th>rtol</th>'
            f'<th>result</th><th></th></tr></thead><tbody>{grads}</tbody></table>{no_grad}')


def _verdict(ok: bool, note: str) -> str:
    return (f'<td class="{"good" if ok else "bad"}">{"pass" if ok else "FAIL"}</td>'
            f'<td>{escape(note)}</td>')


def _spread(b, name: str) -> str:
    lo, hi = b.spread.get(name, (None, None))
    return "&ndash;" if lo is None else f"{lo:.1f}&ndash;{hi:.1f}"


def _counters_html(report) -> str:
    if not report.counters:
        return "<p class='meta'>No compile_norm counter moved.</p>"
    body = "".join(f'<tr><td class="src">{escape(k)}</td><td class="num">{v}</td></tr>'
                   for k, v in sorted(report.counters.items()))
    return f'<table class="data"><tbody>{body}</tbody></table>'


def render(report) -> str:
    fused = report.fused
    stages = ", ".join(f"{name} {n}" for name, n in report.rewrites().items())
    n_kern = len(report.kernels)
    ok = report.numerics_ok
    speed = f"{report.bench.speedup:.2f}&times;" if report.bench else "&ndash;"
    cards = (
        f'<div class="card" title="rewrites per stage: {escape(stages)}"><div class="k">fused sites'
        f'</div><div class="v">{len(fused)}</div><div class="k">{escape(stages)}</div></div>'
        f'<div class="card"><div class="k">left unfused</div><div class="v">{len(report.unmatched)}</div></div>'
        f'<div class="card"><div class="k">graphs</div><div class="v">{len(report.graphs)}</div></div>'
        f'<div class="card"><div class="k">kernels</div><div class="v">{n_kern}</div></div>'
        f'<div class="card"><div class="k">numerics</div><div class="v {"good" if ok else "bad"}">'
        f'{"pass" if ok else "FAIL"}</div></div>'
        f'<div class="card"><div class="k">vs stock compile</div><div class="v">{speed}</div></div>')
    if report.train:
        t_ok = report.train.ok
        cards += (f'<div class="card" title="{escape(report.train.summary(), quote=True)}"><div '
                  f'class="k">training step</div><div class="v {"good" if t_ok else "bad"}">'
                  f'{"pass" if t_ok else "FAIL"}</div><div class="k">loss and gradients</div></div>')
    warnings = "".join(f'<div class="warn">{escape(w)}</div>' for w in report.warnings)
    opts = escape(json.dumps(report.options)) if report.options else "none"
    legend = ('<div class="legend"><span><i class="sw added"></i>added (fused IR node in bold blue)'
              '</span><span><i class="sw removed"></i>removed</span><span><i class="sw changed">'
              '</i>replaced on the same row</span><span><i class="sw rewired"></i>same node, new '
              'inputs</span><span><i class="sw ir"></i><b style="color:var(--ir)">compile_norm.*'
              '</b> IR op</span><span>hover a node for its model source line</span></div>')
    sections = [
        *([("train", "Training step: forward and backward", _train_html(report))]
          if report.train else []),
        ("summary", "Fused and unfused sites", _sites_html(report)),
        ("stages", "Graphs, pass by pass", legend + (_stages_html(report) or
                                                     "<p>No stage was observed.</p>")),
        ("kernels", f"Generated kernels ({n_kern})", _kernels_html(report)),
        ("numerics", "Numerics: compiled vs eager", _numerics_html(report)),
        ("bench", "Time", _bench_html(report)),
        ("counters", "Counters", _counters_html(report)),
    ]
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(title)}</h2>{html}</section>'
                   for sid, title, html in sections)
    depyf = (f'<p class="meta">depyf dump: <code>{escape(report.depyf_dir)}</code></p>'
             if report.depyf_dir else "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>compile_norm inspect: {escape(report.title)}</title><style>{_CSS}</style></head>"
        f'<body><header><h1>compile_norm inspect &middot; {escape(report.title)}</h1>'
        f'<div class="meta">backend <code>{escape(report.backend)}</code> &middot; options '
        f'<code>{opts}</code> &middot; device <code>{escape(report.device)}</code> &middot; '
        f'torch <code>{escape(report.torch_version)}</code></div>'
        f'<div class="cards">{cards}</div><nav>{nav}</nav></header>'
        f"<main>{warnings}{depyf}{body}</main><script>{_JS}</script></body></html>"
    )
