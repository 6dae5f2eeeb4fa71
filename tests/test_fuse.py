import pytest
import torch
from torch._dynamo.utils import counters

import compile_norm
from compile_helpers import assert_close, cn, no_caches


class Block(torch.nn.Module):
    def __init__(self, hidden=24):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden))
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x, r):
        h = x + r
        return self.proj(cn.rms_norm(h, self.weight, 1e-6)), h


def run_fused(fused, *args):
    torch._dynamo.reset()
    counters.clear()
    with no_caches():
        out = fused(*args)
    return out, dict(counters["compile_norm"])


def test_fuse_instance_class_and_function():
    x, r = torch.randn(3, 24), torch.randn(3, 24)
    block = Block()
    out, counts = run_fused(compile_norm.fuse(block, options={"strict": True}), x, r)
    assert counts["residual_matched"] == 1
    for got, want in zip(out, block(x, r)):
        assert_close(got, want, torch.float32)

    FusedBlock = compile_norm.fuse(Block, dynamic=True)
    assert FusedBlock.__name__ == "Block" and issubclass(FusedBlock, Block)
    fb = FusedBlock()
    out, counts = run_fused(fb, x, r)
    assert counts["residual_matched"] == 1 and isinstance(fb, Block)

    @compile_norm.fuse(fullgraph=True, options={"passes": ["gemma", "quant"]})
    def f(x, r, w):
        return cn.rms_norm(x + r, w, 1e-6)

    w = torch.randn(24)
    out, counts = run_fused(f, x, r, w)
    assert "residual_matched" not in counts and counts["lower_matched"] == 1
    assert_close(out, cn.rms_norm(x + r, w, 1e-6), torch.float32)


def test_fuse_rejects_bad_arguments_early():
    with pytest.raises(ValueError, match="unknown option"):
        compile_norm.fuse(Block(), options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown argument"):
        compile_norm.fuse(Block(), backend="eager")
    with pytest.raises(ValueError, match="target must be"):
        compile_norm.fuse(3)
