"""Property-based tests: every op on random shapes, dtypes, eps, weights, strides and schemes.

Two properties:

- eager (CPU): each op equals its reference bit for bit, a fused norm + quantization op equals
  the composition of its parts bit for bit, ``residual_out`` is ``x + residual``, the fake
  implementation promises the real shapes/dtypes/strides, and the norm matches an independent
  float64 formula within the output dtype's rounding;
- compiled (``backend="compile_norm"``) vs eager within the compile tolerances of
  ``compile_helpers`` (Inductor keeps float32 across casts): fp32 1e-5, fp16 2e-3, bf16 1.6e-2,
  int8 +-1, fp8 one e4m3 step.

Profiles: ``ci`` (default; fixed, derandomized, small) and ``long`` (``HYPOTHESIS_PROFILE=long``).
Compiles are slow, so the compiled property runs few examples on tiny sizes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from compile_helpers import TOL, assert_close_q, compile_run
from compile_norm.ops import registry
from helpers import DTYPES, assert_bitwise_equal

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=1500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
COMPILED_EXAMPLES = 60 if PROFILE == "long" else 8
EAGER_PER_OP = 200 if PROFILE == "long" else 8  # eager properties run per op: every scheme

OPS = sorted(registry.ops())
# (rms_norm_gated has tests of its own: tests/test_gated.py)
NORM_OPS = [n for n in OPS if registry.spec(n).normalizes]
MAX_ELEMENTS = 1 << 17  # tokens * hidden per eager example: big hidden sizes, few tokens


def scheme_of(name: str) -> str | None:
    return registry.spec(name).scheme_name


# --- strategies ---------------------------------------------------------------------------

HIDDEN_EAGER = st.one_of(
    st.sampled_from([64, 128, 256, 1024, 4096, 8192, 16384, 65536]),  # powers of two
    st.sampled_from([96, 192, 320, 1000, 1536, 2880, 5120, 7168, 14336, 65528]),
    st.integers(64, 65536),
)
HIDDEN_COMPILED = st.sampled_from([8, 24, 48, 64, 80, 96])


@st.composite
def group_size(draw, hidden: int) -> int:
    divisors = [g for g in (8, 16, 32, 64, 128, 256) if hidden % g == 0] or [
        d for d in range(1, min(hidden, 256) + 1) if hidden % d == 0
    ]
    return draw(st.sampled_from(divisors))


@st.composite
def scheme_kwargs(draw, scheme: str | None, hidden: int) -> dict:
    if scheme is None:
        return {}
    if scheme in ("fp8_static", "int8_static"):
        # float32 scale; small enough that some values saturate sometimes.
        kw = {"scale": torch.tensor(draw(st.sampled_from([0.004, 0.0071, 0.02, 0.3])))}
        if scheme == "int8_static" and draw(st.booleans()):
            kw["azp"] = torch.tensor(draw(st.integers(-20, 20)), dtype=torch.int32)
        return kw
    if scheme == "fp8_dynamic":
        return {"scale_ub": torch.tensor(draw(st.sampled_from([0.5, 1.5, 100.0])))} if draw(st.booleans()) else {}
    if scheme == "fp8_group":
        return {
            "group_size": draw(group_size(hidden)),
            "column_major_scales": draw(st.booleans()),
            "use_ue8m0": draw(st.booleans()),
        }
    if scheme == "mxfp8":
        return {"block_size": draw(group_size(hidden)),
                "scaling_mode": draw(st.sampled_from(["floor", "ceil", "even", "rceil"]))}
    return {}


@st.composite
def tensor(draw, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Random values (seeded by hypothesis) in ``shape``, contiguous or not: a slice of a wider
    last dim, a transpose of the leading dims, or a stride-2 view of the tokens."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    layout = draw(st.sampled_from(["contiguous", "sliced", "transposed", "strided"]))

    def make(*s):
        return (torch.randn(*s, generator=gen) * scale).to(dtype)

    if layout == "sliced":
        return make(*shape[:-1], shape[-1] + 5)[..., : shape[-1]]
    if layout == "transposed" and len(shape) >= 3:
        return make(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "strided" and len(shape) >= 2:
        return make(*shape[:-2], 2 * shape[-2], shape[-1])[..., ::2, :]
    return make(*shape)


@st.composite
def op_call(draw, names, hidden_st, max_elements: int, max_lead: int):
    """(op name, args, kwargs, dtype) for a random valid call."""
    name = draw(st.sampled_from(names))
    hidden = draw(hidden_st)
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(2, 4))
    budget = max(1, max_elements // hidden)
    lead = []
    for _ in range(ndim - 1):
        lead.append(draw(st.integers(1, max(1, min(max_lead, budget)))))
        budget = max(1, budget // lead[-1])
    if draw(st.integers(0, 9)) == 0:  # zero tokens
        lead[draw(st.integers(0, len(lead) - 1))] = 0
    shape = (*lead, hidden)
    x = draw(tensor(shape, dtype))
    scheme = scheme_of(name)
    skw = draw(scheme_kwargs(scheme, hidden))
    if name.startswith("quant_"):
        return name, (x,), skw, dtype
    weight = None
    if draw(st.booleans()):
        weight = draw(tensor((hidden,), draw(st.sampled_from([dtype, torch.float32]))))
    eps = draw(st.sampled_from([0.0, 1e-6, 1e-5, 0.1]))
    if registry.spec(name).gated:  # (x, gate, weight, eps, ...): gate after or before the norm
        before = draw(st.booleans())
        group = "norm_group_size" if scheme else "group_size"  # fused ops: the scheme may have one
        kw = {"norm_before_gate": not before,
              group: draw(st.one_of(st.none(), group_size(hidden))) if before else None}
        return name, (x, draw(tensor(shape, dtype)), weight, eps), {**skw, **kw}, dtype
    if name == "rms_norm_add_rms_norm":  # (x, residual, x_weight, x_eps, weight, eps, ...)
        weight2 = draw(tensor((hidden,), draw(st.sampled_from([dtype, torch.float32]))))
        kw = {"weight_offset": draw(st.sampled_from([0.0, 1.0]))}
        if weight is not None:
            kw["x_weight_offset"] = draw(st.sampled_from([0.0, 1.0, -0.5]))
        args = (x, draw(tensor(shape, dtype)), weight, eps, weight2, draw(st.sampled_from([0.0, 1e-6])))
        return name, args, kw, dtype
    norm_kw = {}
    if weight is not None and draw(st.booleans()):
        norm_kw["weight_offset"] = draw(st.sampled_from([1.0, 0.5, -1.0]))
    if draw(st.booleans()):
        norm_kw["variance_size"] = draw(st.integers(1, hidden))
    # fused add: (x, residual, ...); the backward: (grad, x, ...)
    two = name.startswith("fused_add_") or name == "rms_norm_backward"
    args = (x, draw(tensor(shape, dtype)), weight, eps) if two else (x, weight, eps)
    return name, args, {**skw, **norm_kw}, dtype


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def call(name, args, kwargs):
    return getattr(torch.ops.compile_norm, name)(*args, **kwargs)


# --- eager: op vs reference and formulas --------------------------------------------------

@pytest.mark.parametrize("op_name", OPS)
@settings(max_examples=EAGER_PER_OP)
@given(data=st.data())
def test_eager_op_equals_reference(op_name, data):
    name, args, kwargs, dtype = data.draw(op_call([op_name], HIDDEN_EAGER, MAX_ELEMENTS, max_lead=64))
    out = call(name, args, kwargs)
    ref = registry.ops()[name].reference(*args, **kwargs)
    assert_bitwise_equal(out, ref, nan_equal=True)
    # The fake promises what the op returns (shapes, dtypes, strides).
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kw = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        fake = call(name, fake_args, fake_kw)
    for f, o in zip(as_tuple(fake), as_tuple(out)):
        if o is None:  # rms_norm_backward's dweight without a weight
            assert f is None
            continue
        assert (f.shape, f.dtype) == (o.shape, o.dtype)
        assert significant_strides(f) == significant_strides(o)


def significant_strides(t: torch.Tensor) -> tuple:
    """Strides that address memory: none when empty, and none of size-1 dims."""
    if t.numel() == 0:
        return ()
    return tuple(st for size, st in zip(t.shape, t.stride()) if size > 1)


@pytest.mark.parametrize("op_name", NORM_OPS)
@settings(max_examples=EAGER_PER_OP)
@given(data=st.data())
def test_eager_fused_op_is_its_formula(op_name, data):
    """Fused ops equal their parts composed; the norm equals a float64 formula."""
    name, args, kwargs, dtype = data.draw(op_call([op_name], HIDDEN_EAGER, MAX_ELEMENTS, max_lead=64))
    cn = torch.ops.compile_norm
    out = as_tuple(call(name, args, kwargs))
    scheme = scheme_of(name)
    norm_kw = {k: kwargs.pop(k) for k in ("weight_offset", "variance_size") if k in kwargs}
    if name.startswith("fused_add_"):
        x, residual, weight, eps = args
        h = x + residual
        assert_bitwise_equal(out[-1], h.contiguous())
        out = out[:-1]
    else:
        x, weight, eps = args
        h = x
    y = cn.rms_norm(h, weight, eps, **norm_kw)
    if scheme is not None:
        assert_bitwise_equal(out, as_tuple(getattr(cn, f"quant_{scheme}")(y, **kwargs)))
        return
    # Independent formula in float64: y = x / sqrt(mean(x[:n]^2) + eps) * (w + offset).
    x64 = h.double()
    n = norm_kw.get("variance_size") or h.shape[-1]
    expect = x64 / torch.sqrt(x64[..., :n].pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        expect = expect * (weight.double() + norm_kw.get("weight_offset", 0.0))
    finite = torch.isfinite(expect)
    # Two roundings to x.dtype (Llama: normalized value, then product) plus fp32 statistics.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out[0].double()[finite], expect[finite], rtol=tol, atol=tol)


# --- compiled vs eager --------------------------------------------------------------------

def assert_close_outputs(name, actual, expected, dtype):
    for i, (a, e) in enumerate(zip(as_tuple(actual), as_tuple(expected))):
        if e is None:  # rms_norm_backward's dweight without a weight
            assert a is None, i
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape, a.dtype, e.dtype)
        if a.numel() == 0:
            continue
        if a.dtype == torch.float8_e8m0fnu:  # MX scales: the op stays a call (exact)
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8))
        elif a.dtype in (torch.float8_e4m3fn, torch.int8):
            assert_close_q(a, e)
        elif a.dtype == torch.int32:  # asymmetric zero point: one step of a scale that moved
            assert (a - e).abs().max().item() <= 1
        elif a.dtype == torch.float32 and dtype != torch.float32 and e.dtype == torch.float32:
            # scales computed from values Inductor did not round to x.dtype
            torch.testing.assert_close(a, e, rtol=TOL[dtype], atol=1e-12)
        else:
            torch.testing.assert_close(a, e, rtol=TOL[a.dtype], atol=TOL[a.dtype] * 2)


def _zero_token_cases():
    """Always-run compiled examples: zero tokens, non-contiguous, 3-D/4-D, 16-bit, schemes."""
    x3 = torch.randn(0, 2, 48).to(torch.bfloat16).transpose(0, 1)  # [2, 0, 48], strided
    x4 = torch.randn(2, 0, 3, 40 + 3)[..., :40].to(torch.float16)  # sliced last dim
    w = torch.randn(48, dtype=torch.bfloat16)
    return [
        ("fused_add_rms_norm_fp8_group", (x3, torch.randn(2, 0, 48).to(torch.bfloat16), w, 1e-6),
         {"group_size": 16, "column_major_scales": True, "use_ue8m0": True, "weight_offset": 1.0},
         torch.bfloat16),
        ("rms_norm_int8_dynamic_asym", (x4, None, 1e-5), {"variance_size": 24}, torch.float16),
    ]


@settings(max_examples=COMPILED_EXAMPLES)
@given(op_call(OPS, HIDDEN_COMPILED, max_elements=512, max_lead=6))
@example(_zero_token_cases()[0])
@example(_zero_token_cases()[1])
def test_compiled_matches_eager(case):
    name, args, kwargs, dtype = case
    fn = lambda *a: call(name, a, kwargs)  # noqa: E731
    eager = fn(*args)
    c = compile_run(fn, *args, dynamic=False, options={"strict": True})
    assert_close_outputs(name, c.out, eager, dtype)
    if scheme_of(name) != "mxfp8":  # Inductor's pattern matcher skips nodes with E8M0 outputs
        assert "torch.ops.compile_norm" not in c.code, "the op was left as an extern call"


def test_profiles_are_bounded():
    assert settings.get_profile("ci").max_examples <= 100 and (EAGER_PER_OP <= 10 or PROFILE == "long")
    assert settings.get_profile("ci").derandomize and settings.get_profile("ci").deadline is None
    assert COMPILED_EXAMPLES <= 8 or PROFILE == "long"
    assert all(math.log2(h) % 1 for h in (96, 1000, 65528))  # non-powers of two are drawn
