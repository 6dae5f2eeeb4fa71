"""Pass results survive compile-cache hits: a warm compile reports what the cold one did.

Every test compiles with the real FX graph and AOTAutograd caches on, in a fresh cache
directory of its own (``fresh_cache``), twice: cold, then after ``torch._dynamo.reset()`` warm
(a cache hit, so the passes do not run). Counters, log lines and warnings must be the same.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from compile_norm.passes import residual, results_cache
from helpers import randn

from compile_helpers import assert_close
from models import LlamaRMSNorm

H = 40  # not a power of two


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = LlamaRMSNorm(H), LlamaRMSNorm(H)
        self.proj = torch.nn.Linear(H, H)

    def forward(self, x, r):
        h = x + r
        return self.n2(self.proj(self.n1(h)) + h)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def clear(self):
        self.records.clear()


@pytest.fixture
def cn_log():
    """The compile_norm logger's records, read at the logger itself: once torch's logging set it
    up (TORCH_LOGS, set_logs) it no longer propagates to the root logger, as torch's own do not."""
    logger, records = logging.getLogger("compile_norm"), _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


def _hits() -> int:
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def _compile_twice(model, *args, aot_cache=True, train=False, caplog=None):
    """[(counters, log lines, hits)] of a cold and a warm compile in one fresh cache dir."""
    runs = []
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=aot_cache):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            if caplog is not None:
                caplog.clear()
            compiled = torch.compile(model, backend="compile_norm")
            with contextlib.nullcontext() if train else torch.no_grad():
                out = compiled(*args)
            if train:
                out.sum().backward()
            lines = [r.getMessage() for r in caplog.records] if caplog is not None else []
            runs.append((dict(counters["compile_norm"]), lines, _hits(), out))
            assert not any(k.startswith(results_cache.CARRIER) for k in counters["inductor"])
    return runs


@pytest.mark.parametrize("aot_cache", [True, False], ids=["aot_hit", "fx_graph_hit"])
def test_counters_and_logs_same_on_warm_cache(aot_cache, cn_log):
    model = Block().eval()
    x, r = randn(2, 7, H), randn(2, 7, H)
    (cold, cold_log, cold_hits, out0), (warm, warm_log, warm_hits, out1) = _compile_twice(
        model, x, r, aot_cache=aot_cache, caplog=cn_log)
    assert cold_hits == 0 and warm_hits >= 1  # the second compile was a cache hit
    assert cold["canonicalize_matched"] == 2 and cold["residual_matched"] == 2
    assert warm == cold
    rewrites = [m for m in cold_log if "rewrote" in m]
    assert rewrites and [m for m in warm_log if "rewrote" in m] == rewrites
    assert any("loaded from a compile cache" in m for m in warm_log)
    assert not any("loaded from a compile cache" in m for m in cold_log)
    with torch.no_grad():
        want = model(x, r)
    assert_close(out0, want, torch.float32)
    assert_close(out1, want, torch.float32)


def test_backward_graph_compiled_later_reported_on_warm_cache(cn_log):
    # Without the AOTAutograd cache the backward graph is compiled (an FX graph cache hit)
    # at .backward(), after the backend's call returned: its results arrive then.
    model = Block()
    x = randn(3, H).requires_grad_(True)
    (cold, cold_log, cold_hits, _), (warm, warm_log, warm_hits, _) = _compile_twice(
        model, x, randn(3, H), aot_cache=False, train=True, caplog=cn_log)
    assert cold_hits == 0 and warm_hits >= 2  # forward and backward
    assert cold["pre_grad_canonicalize_matched"] == 2, cold  # training: the norms fuse before autograd
    assert cold["lower_matched"] >= 3, cold  # two forward ops and the backward op(s)
    assert warm == cold and [m for m in warm_log if "unfused" in m] == [m for m in cold_log if "unfused" in m]
    assert sum("loaded from a compile cache" in m for m in warm_log) == 2  # both graphs


def test_failed_pass_reported_on_warm_cache(monkeypatch):
    def boom(self, graph, options):
        raise RuntimeError("boom")

    monkeypatch.setattr(residual.ResidualPass, "run", boom)
    model = Block().eval()
    x, r = randn(4, H), randn(4, H)
    with pytest.warns(RuntimeWarning, match="pass 'residual' failed.*boom") as record:
        (cold, *_), (warm, _, warm_hits, _) = _compile_twice(model, x, r)
    assert warm_hits >= 1
    assert cold["residual_failed"] == warm["residual_failed"] == 1 and warm == cold
    assert sum("boom" in str(w.message) for w in record) == 2  # once per compile, warm included


def test_hugging_face_snippet_prints_the_same_counters_twice():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 96, (1, 9))

    def snippet():
        compiled = torch.compile(model, backend="compile_norm", fullgraph=True)
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)
        return dict(torch._dynamo.utils.counters["compile_norm"])

    printed = []
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            printed.append(snippet())
        assert _hits() >= 1
    assert printed[0]["canonicalize_matched"] == 3 and printed[0]["residual_matched"] == 2  # 2L+1, 2L
    assert printed[1] == printed[0]


def test_carrier_round_trip():
    from compile_norm.passes.base import PassResult

    results = [PassResult("canonicalize", 2, [("rsqrt_3 at m.py:4", "eps is a tensor")]),
               PassResult("lower", 1, counts={"lower_triton_kernel": 1}),
               PassResult("residual", error="RuntimeError: boom")]
    assert results_cache.parse_carrier(results_cache.carrier_key(results)) == results
