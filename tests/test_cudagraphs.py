"""mode="reduce-overhead" with the compile_norm backend: CUDA graph trees record once, then
replay, and every call's outputs are right."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from compile_helpers import no_caches

cn = torch.ops.compile_norm
EPS = 1e-6


def block(x, residual, w1, w2):
    """A hand-written Llama norm after a residual add, then norm + FP8 dynamic quantization."""
    h = x + residual
    hf = h.float()
    y = w1 * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    q, scale, h2 = cn.fused_add_rms_norm_fp8_dynamic(y, h, w2, EPS)
    return q, scale, h2


def plain_block(x, residual, w1, w2):
    return block(x, residual, w1, w2)


def bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_close_to_eager(out, want):
    """Against eager within the error of the first norm: y is rounded once by the compiled code
    and once by eager HF code, so y may differ by an ulp; h2 = y + h can cancel, so that ulp
    reaches q as an absolute error. Bound: 2 ulps of |y| <= 4 (2**-5), times rstd * |w2| over
    the row scale: a few units of the 448-wide FP8 range (4 allowed), not a relative error."""
    q, scale, h2 = out
    wq, wscale, wh2 = want
    torch.testing.assert_close(h2, wh2, rtol=2**-7, atol=2**-4)
    torch.testing.assert_close(scale, wscale, rtol=2**-6, atol=0)
    deq, wdeq = q.float() * scale, wq.float() * wscale
    err = (deq - wdeq).abs() - 0.13 * wdeq.abs()
    assert (err <= 4 * wscale).all(), f"max error {(err / wscale).max().item():.2f} scale units"


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
    plain = torch.compile(plain_block, backend="compile_norm", dynamic=False)  # same code, no graphs
    with no_caches():
        for step in range(6):
            x = torch.randn(8, hidden, device="cuda", dtype=dtype)
            r = torch.randn(8, hidden, device="cuda", dtype=dtype)
            torch.compiler.cudagraph_mark_step_begin()
            out = [t.clone() for t in f(x, r, w1, w2)]  # replays overwrite the graph's outputs
            # A replay computes exactly what the same compiled code computes without graphs.
            for got, want in zip(out, plain(x, r, w1, w2)):
                assert torch.equal(bits(got), bits(want)), f"step {step}"
            assert_close_to_eager(out, block(x, r, w1, w2))
    assert counters["compile_norm"]["canonicalize_matched"] == 2  # f and plain
    assert counters["compile_norm"]["residual_matched"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.roots, "a cudagraph tree was recorded"
    assert len(replays) >= 3, f"graphs replayed {len(replays)} times in 6 calls"
