import pytest
import torch

from compile_helpers import assert_close, cn, compile_run

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def one_layer(x, r, w):
    h = x + r
    return cn.rms_norm(h, w, 1e-6), h * 2  # h also feeds the residual stream


def layers(x, w1, w2, w3):
    h = x
    outs = []
    for w in (w1, w2, w3):
        y = cn.rms_norm(h, w, 1e-5)
        h = h + y.sin()  # layer i's residual_out feeds layer i+1's add
        outs.append(cn.rms_norm(h, w, 1e-5))
    return outs[-1], h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 24)])
def test_add_norm_fuses_into_one_kernel(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    r, w = torch.randn_like(x), torch.randn(shape[-1], dtype=dtype)
    c = compile_run(one_layer, x, r, w, options={"strict": True})
    assert c.counts["residual_matched"] == 1
    assert c.ops("residual", "before") == {"rms_norm"}
    assert c.ops("residual", "after") == {"fused_add_rms_norm"}
    assert c.ops("lower", "after") == set()
    assert "compile_norm" not in c.code and len(c.kernels) == 1
    for got, want in zip(c.out, one_layer(x, r, w)):
        assert_close(got, want, dtype)


def test_non_contiguous_input():
    base = torch.randn(6, 64, dtype=torch.bfloat16)
    x, r = base[:, 8:48], torch.randn(40, 6, dtype=torch.bfloat16).t()
    w = torch.randn(40, dtype=torch.bfloat16)
    c = compile_run(one_layer, x, r, w)
    assert c.counts["residual_matched"] == 1
    for got, want in zip(c.out, one_layer(x, r, w)):
        assert_close(got, want, torch.bfloat16)


def test_chain_of_layers():
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    ws = [torch.randn(24, dtype=torch.bfloat16) for _ in range(3)]
    c = compile_run(layers, x, *ws, options={"strict": True})
    # each add feeds two norms: one fuses with it, the other reads its residual_out
    assert c.counts["residual_matched"] == 3
    assert c.ops("residual", "after") == {"rms_norm", "fused_add_rms_norm"}
    for got, want in zip(c.out, layers(x, *ws)):
        assert_close(got, want, torch.bfloat16)


def broadcast(x, r, w):
    return cn.rms_norm(x + r[0], w, 1e-6)


def mixed_dtype(x, r, w):
    return cn.rms_norm(x + r, w, 1e-6)


def with_alpha(x, r, w):
    return cn.rms_norm(torch.add(x, r, alpha=2), w, 1e-6)


@pytest.mark.parametrize(
    "fn, r_dtype, reason",
    [
        (broadcast, torch.bfloat16, "residual add broadcasts"),
        (mixed_dtype, torch.float32, "residual add mixes dtypes"),
        (with_alpha, torch.bfloat16, "residual add has alpha != 1"),
    ],
)
def test_guards_refuse(fn, r_dtype, reason):
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    r = torch.randn(4, 24, dtype=r_dtype)
    w = torch.randn(24, dtype=torch.float32 if fn is mixed_dtype else torch.bfloat16)
    c = compile_run(fn, x, r, w, options={"strict": True})
    assert c.counts.get("residual_matched", 0) == 0
    assert c.counts[f"residual_unmatched: {reason}"] == 1
    assert c.ops("residual", "after") == {"rms_norm"}
    torch.testing.assert_close(c.out, fn(x, r, w), rtol=1.6e-2, atol=3e-2)


def test_dynamic_token_count_no_recompile():
    import torch._dynamo.utils as du

    w = torch.randn(24, dtype=torch.bfloat16)
    torch._dynamo.reset()
    du.counters.clear()
    f = torch.compile(one_layer, backend="compile_norm", dynamic=True, options={"strict": True})
    from compile_helpers import no_caches

    with no_caches():
        for tokens in (3, 7, 12):
            x = torch.randn(tokens, 24, dtype=torch.bfloat16)
            r = torch.randn_like(x)
            for got, want in zip(f(x, r, w), one_layer(x, r, w)):
                assert_close(got, want, torch.bfloat16)
    assert du.counters["stats"]["unique_graphs"] == 1
    assert du.counters["compile_norm"]["residual_matched"] == 1


def test_zero_tokens():
    x = torch.randn(0, 24, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16)
    c = compile_run(one_layer, x, r, w)
    assert c.out[0].shape == (0, 24) and c.out[1].shape == (0, 24)


def add_then_fused_quant(x, r, w, s):
    h = x + r
    q = cn.rms_norm_fp8_static(h, w, 1e-6, scale=s)
    q2, scale = cn.rms_norm_int8_dynamic(h * 2 + r, w, 1e-6)
    return q, q2, scale, h


def test_add_before_norm_quant_ops():
    from compile_helpers import assert_close_q

    x = torch.randn(4, 24, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16)
    s = torch.tensor(0.02)
    c = compile_run(add_then_fused_quant, x, r, w, s, options={"strict": True})
    assert c.counts["residual_matched"] == 2
    assert c.ops("residual", "after") == {"fused_add_rms_norm_fp8_static", "fused_add_rms_norm_int8_dynamic"}
    assert len(c.kernels) == 1
    want = add_then_fused_quant(x, r, w, s)
    assert_close_q(c.out[0], want[0])
    assert_close_q(c.out[1], want[1])
    assert_close(c.out[2], want[2], torch.bfloat16)
    assert_close(c.out[3], want[3], torch.bfloat16)
