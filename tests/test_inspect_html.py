"""The HTML report: structure, highlighting, self-containment, and (with chromium) that it renders."""

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from compile_norm.inspect import InspectReport
from compile_norm.inspect.bench import Bench
from compile_norm.inspect.kernels import Kernel
from compile_norm.inspect.numerics import compare
from compile_norm.inspect.record import StageRecorder
from compile_norm.passes.base import PassResult

CHROMIUM = "/usr/bin/chromium"


def _graph(n_extra):
    """A norm followed by ``n_extra`` unrelated ops (long unchanged runs fold)."""

    def f(x, w):
        v = x.pow(2).mean(-1, keepdim=True)
        y = w * (x * torch.rsqrt(v + 1e-6))
        for _ in range(n_extra):
            y = torch.relu(y)
        return y

    gm = torch.fx.symbolic_trace(f)
    for n in gm.graph.nodes:
        n.meta["stack_trace"] = f'  File "/m/model.py", line 9, in forward\n    y = <{n.name}>\n'
    return gm.graph


def _report():
    graph = _graph(30)
    rec = StageRecorder()
    rec("input", graph)
    (mul,) = [n for n in graph.nodes if n.name == "mul"]
    with graph.inserting_before(mul):
        ir = graph.call_function(torch.ops.compile_norm.rms_norm.default, (mul.args[0], None, 1e-6))
    mul.replace_all_uses_with(ir)
    graph.eliminate_dead_code()
    rec("canonicalize", graph, PassResult("canonicalize", 1, [("rsqrt_7", "eps <b>not</b> float")]))
    rec("residual", graph, PassResult("residual"))
    e = torch.randn(4, 8)
    report = InspectReport(
        "Tiny <model>", "compile_norm", {"strict": True}, "cpu", torch.__version__,
        graphs=rec.graphs,
        kernels=[Kernel("cpp_fused_relu_0", "cpp_pybinding", 0, "void kernel() { /* a < b */ }")],
        calls={"extern_kernels.mm": 2}, code_included=True,
        numerics=compare(e + 1e-6, e), bench=Bench("cpu", 5, 10, 80.0, 100.0, 150.0),
        counters={"canonicalize_matched": 1},
    )
    return report, ir.name


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.cells, self.urls, self.tags = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "td":
            self.cells.append((set((a.get("class") or "").split()), a.get("data-node")))
        for key in ("href", "src", "action"):
            if a.get(key):
                self.urls.append(a[key])


def test_html_structure_and_highlights(tmp_path):
    report, ir_name = _report()
    page = report.to_html()
    p = _Collect()
    p.feed(page)
    assert {"summary", "stages", "kernels", "numerics", "bench", "counters"} <= p.ids
    added = [node for cls, node in p.cells if "added" in cls]
    fused = [node for cls, node in p.cells if "fused" in cls]
    removed = {node for cls, node in p.cells if "removed" in cls}
    assert fused == [ir_name] and ir_name in added
    assert {"pow_1", "mean", "rsqrt", "mul"} <= removed
    assert any("rewired" in cls for cls, _ in p.cells)
    assert "fold" in page and "unchanged nodes" in page  # 30 unchanged relus fold
    # every link stays in the page; no stylesheet or script is fetched
    assert all(u.startswith("#") for u in p.urls), p.urls
    assert "link" not in p.tags and "http://" not in page and "https://" not in page
    assert "@import" not in page
    # model text is escaped, never markup
    assert "<b>not</b>" not in page and "&lt;b&gt;not&lt;/b&gt;" in page
    assert "Tiny &lt;model&gt;" in page and "a &lt; b" in page
    assert "1.25&times;" in page  # stock 100 us / backend 80 us
    assert "model.py:9" in page


def test_html_notes_missing_parts():
    page = InspectReport("m", "compile_norm", {}, "cpu", torch.__version__,
                         warnings=["no pass stage was observed"]).to_html()
    assert "no pass stage was observed" in page and "--bench" in page
    assert "No stage was observed" in page


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")
def test_html_renders_in_chromium(tmp_path):
    report, _ = _report()
    html = tmp_path / "report.html"
    html.write_text(report.to_html(), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1400,1000", f"file://{html}"],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.exists() and shot.stat().st_size > 20_000  # a blank page is ~ 5 kB
    if os.environ.get("COMPILE_NORM_KEEP_SHOT"):
        shutil.copy(shot, os.environ["COMPILE_NORM_KEEP_SHOT"])
