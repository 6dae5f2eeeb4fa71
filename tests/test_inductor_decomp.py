"""Plain ``torch.compile(backend="inductor")`` inlines the compile_norm ops: no opaque calls."""

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, cn, compile_run


def add_norm_quant(x, r, w):
    y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
    q, s = cn.quant_fp8_dynamic(y)
    return q, s, h


def fused_op(x, r, w):
    return cn.fused_add_rms_norm_int8_static(x, r, w, 1e-6, scale=torch.tensor(0.05), weight_offset=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_plain_inductor_generates_one_kernel(dtype):
    x = torch.randn(2, 3, 40, dtype=dtype)
    r, w = torch.randn_like(x), torch.randn(40, dtype=dtype)
    c = compile_run(add_norm_quant, x, r, w, backend="inductor")
    assert "compile_norm" not in c.code and len(c.kernels) == 1
    q, s, h = c.out
    wq, ws, wh = add_norm_quant(x, r, w)
    assert_close_q(q, wq)
    assert_close(s, ws, dtype)
    assert_close(h, wh, dtype)


def test_plain_inductor_fused_quant_op():
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16)
    c = compile_run(fused_op, x, r, w, backend="inductor")
    assert "compile_norm" not in c.code and len(c.kernels) == 1
    assert_close_q(c.out[0], fused_op(x, r, w)[0])
    assert_close(c.out[1], fused_op(x, r, w)[1], torch.bfloat16)


def test_plain_inductor_dynamic_tokens():
    import torch._dynamo.utils as du

    from compile_helpers import no_caches

    torch._dynamo.reset()
    du.counters.clear()
    f = torch.compile(add_norm_quant, dynamic=True)
    w = torch.randn(24, dtype=torch.bfloat16)
    with no_caches():
        for t in (2, 5, 9):
            x = torch.randn(t, 24, dtype=torch.bfloat16)
            r = torch.randn_like(x)
            assert_close_q(f(x, r, w)[0], add_norm_quant(x, r, w)[0])
    assert du.counters["stats"]["unique_graphs"] == 1
