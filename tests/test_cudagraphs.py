"""mode="reduce-overhead" with the compile_norm backend: CUDA graph trees record once, then
replay, and every call's outputs are right."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from compile_helpers import assert_close, assert_close_q, no_caches

cn = torch.ops.compile_norm
EPS = 1e-6


def block(x, residual, w1, w2):
    """A hand-written Llama norm after a residual add, then norm + FP8 dynamic quantization."""
    h = x + residual
    hf = h.float()
    y = w1 * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    q, scale, h2 = cn.fused_add_rms_norm_fp8_dynamic(y, h, w2, EPS)
    return q, scale, h2


@pytest.mark.cuda
def test_reduce_overhead_replays_cuda_graphs(monkeypatch):
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay

    def counting_replay(self):
        replays.append(1)
        return real_replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting_replay)
    torch._dynamo.reset()
    counters.clear()
    hidden, dtype = 320, torch.bfloat16
    w1 = torch.randn(hidden, device="cuda", dtype=dtype)
    w2 = torch.randn(hidden, device="cuda", dtype=dtype)
    f = torch.compile(block, backend="compile_norm", mode="reduce-overhead", dynamic=False)
    with no_caches():
        for step in range(6):
            x = torch.randn(8, hidden, device="cuda", dtype=dtype)
            r = torch.randn(8, hidden, device="cuda", dtype=dtype)
            torch.compiler.cudagraph_mark_step_begin()
            out = [t.clone() for t in f(x, r, w1, w2)]  # replays overwrite the graph's outputs
            want = block(x, r, w1, w2)
            assert_close_q(out[0], want[0])
            assert_close(out[1], want[1], dtype)  # scales from values Inductor kept in fp32
            assert_close(out[2], want[2], dtype)
    assert counters["compile_norm"]["canonicalize_matched"] == 1
    assert counters["compile_norm"]["residual_matched"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.roots, "a cudagraph tree was recorded"
    assert len(replays) >= 3, f"graphs replayed {len(replays)} times in 6 calls"
