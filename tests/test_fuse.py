import pytest
import torch
from torch._dynamo.utils import counters

import compile_norm
import models  # LlamaRMSNorm: Hugging Face's forward, the frame every instance shares
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


SIZES = (16, 24, 40, 48, 64, 72, 80, 96, 112, 136)  # more sizes than the recompile limit (8)


@pytest.mark.parametrize("how", ["class", "instance"])
def test_500_norm_instances_of_mixed_sizes_stay_under_the_recompile_limit(how):
    # Gemma-family models have hundreds of norms of several sizes (and eps values); with
    # static parameter shapes each size is a graph of the one shared forward, and after 8
    # Dynamo gives up and runs the rest eagerly, unfused.
    # torch's default limits (a benchmark run in-process by another test may have raised them)
    limits = {"recompile_limit": 8, "accumulated_recompile_limit": 256}
    with torch._dynamo.config.patch(**{k: v for k, v in limits.items() if hasattr(torch._dynamo.config, k)}):
        _compile_500_norms(how)


def _compile_500_norms(how):
    torch._dynamo.reset()
    counters.clear()
    cls = compile_norm.fuse(models.LlamaRMSNorm) if how == "class" else models.LlamaRMSNorm
    norms = [cls(SIZES[i % len(SIZES)], eps=1e-5 if i % 3 == 0 else 1e-6) for i in range(500)]
    if how == "instance":
        norms = [compile_norm.fuse(n) for n in norms]
    with torch.no_grad(), no_caches():
        for i, norm in enumerate(norms):
            x = torch.randn(2, 3, SIZES[i % len(SIZES)])
            plain = norm if how == "class" else norm._orig_mod
            assert_close(norm(x), models.LlamaRMSNorm.forward(plain, x), torch.float32)
    graphs = counters["stats"]["unique_graphs"]
    # a static graph for the first size, then a dynamic-size one per eps value
    assert graphs <= 4, graphs
    assert counters["frames"]["total"] == counters["frames"]["ok"] == graphs
    assert counters["compile_norm"]["canonicalize_matched"] == graphs  # every graph fused
    assert counters["compile_norm"]["canonicalize_unmatched"] == 0


def test_dynamic_false_keeps_parameter_shapes_static():
    torch._dynamo.reset()
    counters.clear()
    cls = compile_norm.fuse(models.LlamaRMSNorm, dynamic=False)
    with torch.no_grad(), no_caches():
        for hidden in (16, 24):
            cls(hidden)(torch.randn(2, hidden))
    assert counters["stats"]["unique_graphs"] == 2  # one per size, as asked
