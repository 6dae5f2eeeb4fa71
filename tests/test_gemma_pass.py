import pytest
import torch

from compile_helpers import assert_close, cn, compile_run


def gemma(x, w):
    return cn.rms_norm(x, w.float() + 1.0, 0.25)  # unusual eps: matched, never baked in


def gemma_radd(x, w):
    return cn.rms_norm(x, 0.5 + w.to(torch.float32), 1e-6)


def gemma_then_residual(x, r, w):
    h = x + r
    return cn.rms_norm(h, w.float() + 1.0, 1e-6), h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fn", [gemma, gemma_radd])
def test_offset_folds_into_the_norm(fn, dtype):
    x = torch.randn(2, 3, 40, dtype=dtype)
    w = torch.randn(40, dtype=dtype) * 0.1
    c = compile_run(fn, x, w, options={"strict": True, "passes": ["gemma"]})
    assert c.counts["gemma_matched"] == 1
    assert len(c.kernels) == 1 and "compile_norm" not in c.code
    assert_close(c.out, fn(x, w), dtype)


def test_offset_becomes_an_argument():
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    w = torch.randn(24, dtype=torch.bfloat16)
    seen = {}

    from compile_norm.passes.base import observe_stages

    def grab(stage, graph, result):
        if stage == "gemma":
            seen["args"] = [n.args for n in graph.nodes if "rms_norm" in str(n.target)]

    with observe_stages(grab):
        compile_run(gemma, x, w, options={"passes": ["gemma"]})
    (args,) = seen["args"]
    assert args[2] == 0.25 and args[3] == 1.0  # eps and weight_offset, as given
    assert args[1].meta["val"].dtype == torch.bfloat16  # the raw weight


def test_with_residual_fuses_both():
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16)
    c = compile_run(gemma_then_residual, x, r, w, options={"strict": True})
    assert c.counts["gemma_matched"] == 1 and c.counts["residual_matched"] == 1
    assert len(c.kernels) == 1
    for got, want in zip(c.out, gemma_then_residual(x, r, w)):
        assert_close(got, want, torch.bfloat16)


def offset_in_bf16(x, w):
    return cn.rms_norm(x, w + 1.0, 1e-6)  # the offset added in bf16: a different weight


def zero_offset(x, w):
    return cn.rms_norm(x, w.float() + 0.0, 1e-6)


@pytest.mark.parametrize(
    "fn, x_dtype, reason",
    [
        (offset_in_bf16, torch.bfloat16, "weight + offset is not computed in float32"),
        (zero_offset, torch.bfloat16, "weight offset 0 would change the weight dtype"),
        (gemma, torch.float64, "x is float64: the offset would be added in float64"),
    ],
)
def test_guards_refuse(fn, x_dtype, reason):
    x = torch.randn(4, 24, dtype=x_dtype)
    w = torch.randn(24, dtype=torch.bfloat16)
    c = compile_run(fn, x, w, options={"strict": True, "passes": ["gemma"]})
    assert c.counts.get("gemma_matched", 0) == 0
    assert c.counts[f"gemma_unmatched: {reason}"] == 1
    torch.testing.assert_close(c.out, fn(x, w), rtol=1.6e-2, atol=3e-2)
