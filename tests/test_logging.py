"""TORCH_LOGS="compile_norm" / "+compile_norm" and the structured trace (TORCH_TRACE, tlparse)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import torch

from compile_norm.options import PASS_ORDER
from compile_norm.passes import trace
from helpers import child_env


SCRIPT = textwrap.dedent(
    """
    import torch, compile_norm
    def f(x, r, w):
        h = x + r
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    a = (torch.randn(3, 40), torch.randn(3, 40), torch.randn(40))
    with torch._inductor.config.patch(fx_graph_cache=True):
        for _ in range(2):  # cold, then served by the compile caches
            torch._dynamo.reset()
            torch.compile(f, backend="compile_norm")(*a)
    """
)


def _read_trace(folder) -> list[tuple[dict, str]]:
    """(metadata, payload) of every structured-trace record tlparse would read."""
    records: list[tuple[dict, list[str]]] = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                if line.startswith("\t"):
                    records[-1][1].append(line[1:])
                else:
                    records.append((json.loads(line[line.index("] ") + 2:]), []))
    return [(meta, "".join(payload)) for meta, payload in records]


def test_torch_logs_and_structured_trace(tmp_path):
    env = child_env(TORCH_TRACE=str(tmp_path / "trace"),
               TORCH_LOGS="+compile_norm", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stderr
    assert log.count("compile_norm residual: rewrote 1 site(s)") == 2  # cold and warm
    assert "compile_norm lower (auto): " in log  # a DEBUG line
    assert "[__compile_norm_graphs] compile_norm graph after residual:" in log  # the artifact

    artifacts = [(m["artifact"]["name"], payload) for m, payload in _read_trace(tmp_path / "trace")
                 if "artifact" in m and m["artifact"]["name"].startswith("compile_norm")]
    graphs = {name: payload for name, payload in artifacts if name.endswith("_graph")}
    stages = ["input", *PASS_ORDER]
    assert list(graphs) == [f"compile_norm_{s}_graph" for s in stages]
    assert "aten.rsqrt.default" in graphs["compile_norm_input_graph"]
    assert "compile_norm.rms_norm.default" in graphs["compile_norm_canonicalize_graph"]
    assert "compile_norm.fused_add_rms_norm.default" in graphs["compile_norm_residual_graph"]
    assert "compile_norm." not in graphs["compile_norm_lower_graph"]  # lowered to ATen ops
    results = [json.loads(payload) for name, payload in artifacts if name == trace.RESULTS_ARTIFACT]
    assert [r["from_cache"] for r in results] == [False, True]
    assert results[0]["passes"] == results[1]["passes"]
    residual = next(r for r in results[0]["passes"] if r["name"] == "residual")
    assert residual["matched"] == 1 and residual["error"] is None


def test_set_logs_knows_the_registered_names():
    assert torch._logging._internal.log_registry.is_log(trace.LOG)
    assert torch._logging._internal.log_registry.is_artifact(trace.GRAPHS_ARTIFACT)
    logger = logging.getLogger(trace.LOG)
    saved = logger.level, logger.propagate, list(logger.handlers)
    try:
        torch._logging.set_logs(modules={trace.LOG: logging.INFO})
        assert logging.getLogger("compile_norm.passes").isEnabledFor(logging.INFO)
        assert not trace.graphs_log.isEnabledFor(logging.DEBUG)  # graphs are debug output
        torch._logging.set_logs(modules={trace.LOG: logging.DEBUG})
        assert trace.graphs_log.isEnabledFor(logging.DEBUG)
        torch._logging.set_logs()
        assert not logging.getLogger("compile_norm.passes").isEnabledFor(logging.INFO)
    finally:  # as before torch's logging set the logger up (the other tests read it by caplog)
        torch._logging.set_logs()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
