import pytest
import torch

from compile_helpers import assert_close, cn, compile_run
from compile_norm.ops import registry
from compile_norm.ops.quant import SCHEMES


def add_norm(x, r, w):
    return cn.fused_add_rms_norm(x, r, w, 1e-6, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_generated_mode_inlines_every_op(dtype):
    x = torch.randn(3, 5, 40, dtype=dtype)
    r, w = torch.randn_like(x), torch.randn(40, dtype=dtype)
    c = compile_run(add_norm, x, r, w, options={"passes": [], "strict": True})
    assert c.counts["lower_matched"] == 1
    assert c.ops("lower", "before") == {"fused_add_rms_norm"} and c.ops("lower", "after") == set()
    assert "compile_norm" not in c.code and len(c.kernels) == 1
    for got, want in zip(c.out, add_norm(x, r, w)):
        assert_close(got, want, dtype)


# mxfp8 left out: Inductor's pattern matcher skips nodes with E8M0 outputs (the op stays a call)
@pytest.mark.parametrize("scheme", sorted(set(SCHEMES) - {"mxfp8"}))
@pytest.mark.parametrize("tokens", [5, 0])
def test_a_quant_op_alone_is_lowered(scheme, tokens):
    """A quantization no norm feeds is lowered on its own: its reference inlined (the FP8
    schemes' references are wrappers that FX once unwrapped to the wrong parameters)."""
    x = torch.randn(tokens, 256) * 3
    kwargs = SCHEMES[scheme].example_args(SCHEMES[scheme].options, "cpu")
    fn = lambda a: getattr(cn, f"quant_{scheme}")(a, **kwargs)  # noqa: E731
    c = compile_run(fn, x, options={"strict": True})
    assert c.counts["lower_matched"] == 1 and "compile_norm" not in c.code
    want = fn(x)
    for got, ref in zip(c.out if isinstance(c.out, tuple) else (c.out,),
                        want if isinstance(want, tuple) else (want,)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if got.dtype in (torch.float8_e4m3fn, torch.int8):  # one step at most (fp32 inputs)
            assert (got.float() - ref.float()).abs().le(ref.float().abs() * 0.13 + 1).all()
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fake_kernel():
    """A kernel provider for fp32 only, standing in for a real (Triton) one."""
    calls = []

    def fn(*args):
        calls.append(1)
        return registry.ops()["fused_add_rms_norm"].reference(*args)

    supports = lambda x, *rest: x.dtype == torch.float32  # noqa: E731
    registry.register_provider("fused_add_rms_norm", registry.Provider("fake_kernel", fn, supports=supports, source="v1"))
    yield calls
    registry.unregister_provider("fused_add_rms_norm", "fake_kernel")


def test_kernel_mode_keeps_a_call_where_a_kernel_accepts(fake_kernel):
    x = torch.randn(4, 24)
    r, w = torch.randn_like(x), torch.randn(24)
    c = compile_run(add_norm, x, r, w, options={"lowering": "kernel", "passes": []})
    assert c.ops("lower", "after") == {"fused_add_rms_norm"}
    assert c.counts["lower_unmatched: kept as a call to kernel 'fake_kernel'"] == 1
    assert "torch.ops.compile_norm.fused_add_rms_norm" in c.code
    assert fake_kernel, "the compiled graph called the registered kernel"
    for got, want in zip(c.out, add_norm(x, r, w)):
        assert_close(got, want, torch.float32)


def test_kernel_mode_inlines_what_no_kernel_accepts(fake_kernel):
    x = torch.randn(4, 24, dtype=torch.bfloat16)  # fake_kernel takes fp32 only
    r, w = torch.randn_like(x), torch.randn(24, dtype=torch.bfloat16)
    c = compile_run(add_norm, x, r, w, options={"lowering": "kernel", "passes": []})
    assert c.counts["lower_matched"] == 1 and "compile_norm" not in c.code
    assert not fake_kernel
