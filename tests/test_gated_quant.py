"""rms_norm_gated_<scheme>: the gated norm followed by a quantization (ops/fused.py).

- the ops equal ``quant_<scheme>(rms_norm_gated(...))`` bit for bit, and name their own
  arguments in errors;
- their kernel (the row kernel's GATE stage) is its quantization kernel applied to the gated
  kernel's output, bit for bit (through the Triton interpreter in a child process, as
  test_kernels_interpret.py; against the reference: test_kernels_interpret.py's cases), and
  the triton provider takes a call only where the tiles can hold its groups;
- the quant pass fuses transformers' Qwen3NextRMSNormGated / MambaRMSNormGated followed by
  the quantizations written by hand after a norm (into one generated kernel on the CPU, the
  Triton kernel on CUDA).
"""

from __future__ import annotations

import inspect
import json
import pathlib
import sys

import pytest
import torch

from compile_helpers import TOL, assert_close_q, compile_run
from helpers import (SCHEME_NAMES, assert_bitwise_equal, count_kernel_launches,
                     interpreter_report, mamba2_gated_norm, op, qwen3_next_gated_norm, randn,
                     scheme_kwargs)

import compile_norm
from compile_norm.ops import registry

FP8 = torch.float8_e4m3fn
EPS = 1e-6
MIN_SCALE = 1.0 / (448.0 * 512.0)
# (id, norm_before_gate, group size): Qwen3-Next, Mamba-2 on the whole row, Mamba-2 groups
PLACEMENTS = [("after", True, None), ("before", False, None), ("before_groups", False, 32)]


def gated_inputs(shape, dtype, weight_dtype=None):
    x = randn(*shape, dtype=dtype)
    gate = randn(*reversed(shape[:-1]), shape[-1], dtype=dtype, scale=3.0)
    gate = gate.transpose(0, -2) if len(shape) > 2 else gate  # a non-contiguous gate (3-D)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    return x, gate, w


def scheme_group(scheme, x, qkw, default):
    """The norm's group size for a grouped case: the scheme kernel's own group where it has
    one (the tiles hold one kind of group), else ``default``."""
    spec = registry.spec(f"quant_{scheme}")
    call = spec.split(spec.bind((x,), qkw))  # every scheme argument, defaults filled in
    return spec.scheme.kernel(call.x, *call.qargs).group or default


def composed(scheme, x, gate, w, before, group, qkw):
    return op(f"quant_{scheme}")(compile_norm.rms_norm_gated(x, gate, w, EPS, before, group), **qkw)


# --- the ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("pid, before, group", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_fused_op_is_the_composition(scheme, pid, before, group):
    for dtype, shape, wdt in ((torch.bfloat16, (2, 3, 128), None), (torch.float16, (5, 192), None),
                              (torch.float32, (4, 128), None), (torch.bfloat16, (4, 128), torch.float32),
                              (torch.bfloat16, (0, 128), None)):
        x, gate, w = gated_inputs(shape, dtype, wdt)
        qkw = scheme_kwargs(scheme, shape[-1], variant=int(dtype == torch.float16))
        got = op(f"rms_norm_gated_{scheme}")(x, gate, w, EPS, **qkw, norm_before_gate=before,
                                             norm_group_size=group)
        assert_bitwise_equal(got, composed(scheme, x, gate, w, before, group, qkw), nan_equal=True)


def test_fused_signature_is_the_norms_around_the_schemes():
    params = list(inspect.signature(registry.spec("rms_norm_gated_fp8_group").reference).parameters)
    assert params == ["x", "gate", "weight", "eps", "group_size", "column_major_scales", "use_ue8m0",
                      "min_scale", "clamp_amax", "scale_form", "scale_in_x_dtype", "pow2_inverse",
                      "norm_before_gate", "norm_group_size"]
    x, gate, w = gated_inputs((3, 128), torch.bfloat16)
    positional = op("rms_norm_gated_fp8_group")(x, gate, w, EPS, 64, True, False, None, False,
                                                "divide", False, False, False, 32)
    keywords = op("rms_norm_gated_fp8_group")(x, gate, w, EPS, group_size=64, column_major_scales=True,
                                              min_scale=None, norm_before_gate=False, norm_group_size=32)
    assert_bitwise_equal(positional, keywords)


@pytest.mark.parametrize("name, kwargs, message", [
    ("rms_norm_gated_fp8_dynamic", dict(norm_group_size=16),
     "norm_group_size is only for the gate before the norm"),
    ("rms_norm_gated_fp8_dynamic", dict(norm_before_gate=False, norm_group_size=24),
     "norm_group_size=24 must divide the hidden size"),
    ("rms_norm_gated_fp8_group", dict(group_size=24), "group_size=24 must divide the hidden size"),
    ("rms_norm_gated_fp8_static", dict(scale=torch.tensor([0.1, 0.2])),
     "scale must have exactly one element"),
])
def test_bad_arguments_name_the_argument(name, kwargs, message):
    x, gate, w = gated_inputs((4, 64), torch.float32)
    if "scale" not in kwargs and name.endswith("static"):
        kwargs["scale"] = torch.tensor(0.1)
    with pytest.raises(ValueError, match=rf"compile_norm\.{name}: {message}"):
        op(name)(x, gate, w, EPS, **kwargs)
    bad_gate = torch.randn(4, 32)
    with pytest.raises(ValueError, match=rf"compile_norm\.{name}: gate must have the shape of x"):
        op(name)(x, bad_gate, w, EPS, **{k: v for k, v in kwargs.items() if k == "scale"})


# --- the kernel, through the Triton interpreter -------------------------------------------------


def _kernel_schemes() -> list[str]:
    from compile_norm.kernels import checking

    return [s for s in SCHEME_NAMES if f"rms_norm_gated_{s}" in checking.all_ops()]


def _child() -> None:
    from compile_norm.kernels import triton_ops

    assert triton_ops.INTERPRET and triton_ops.SUPPORTED, triton_ops.REASON
    launches = count_kernel_launches(triton_ops)
    kernel = {name: fn for name, (fn, _) in triton_ops.FUNCTIONS.items()}
    results = []
    # 640 = 512 + 128: two tiles, groups of 32 or the scheme's; every placement in bf16, the
    # grouped one in fp32 and with a float32 weight (float32 output) too
    cases = [(torch.bfloat16, None, p) for p in PLACEMENTS] + [
        (torch.float32, None, PLACEMENTS[2]), (torch.bfloat16, torch.float32, PLACEMENTS[2])]
    for scheme in _kernel_schemes():
        for dtype, wdt, (pid, before, group) in cases:
            qkw = scheme_kwargs(scheme, 640, variant=int(dtype == torch.float32))
            x, gate, w = gated_inputs((1, 2, 640), dtype, wdt)
            group = group and scheme_group(scheme, x, qkw, group)
            name = f"{scheme} {pid} {dtype} weight {wdt or dtype}"
            before_launches = launches[0]
            try:
                fused = kernel[f"rms_norm_gated_{scheme}"](x, gate, w, EPS, **qkw, norm_before_gate=before,
                                                           norm_group_size=group)
                one = launches[0] - before_launches
                y = kernel["rms_norm_gated"](x, gate, w, EPS, before, group)
                assert_bitwise_equal(fused, kernel[f"quant_{scheme}"](y, **qkw), nan_equal=True)
                problems = [] if one == 1 else [f"{one} launches, expected 1"]
            except Exception as e:  # report, don't stop the run
                problems = [f"{type(e).__name__}: {e}"]
            results.append({"name": name, "problems": problems})
    # the promoted (float32) output of a 16-bit x: its scale "in x's dtype" is the float32 one
    x, gate, w = gated_inputs((5, 256), torch.bfloat16, torch.float32)
    qkw = dict(min_scale=None, scale_in_x_dtype=True)
    fused = kernel["rms_norm_gated_fp8_dynamic"](x, gate, w, EPS, **qkw, norm_before_gate=False)
    want = kernel["quant_fp8_dynamic"](kernel["rms_norm_gated"](x, gate, w, EPS, False), **qkw)
    try:
        assert_bitwise_equal(fused, want)
        results.append({"name": "promoted scale_in_x_dtype", "problems": []})
    except AssertionError as e:
        results.append({"name": "promoted scale_in_x_dtype", "problems": [str(e)]})

    x, gate, w = gated_inputs((4, 96), torch.bfloat16)
    providers = {
        "groups of 32": registry.which_provider("rms_norm_gated", x, gate, w, EPS, False, 32),
        "groups of 24": registry.which_provider("rms_norm_gated", x, gate, w, EPS, False, 24),
        "one group of 96": registry.which_provider("rms_norm_gated", x, gate, w, EPS, False, 96),
        "fp8 groups of 32, norm groups of 32": registry.which_provider(
            "rms_norm_gated_fp8_group", x, gate, w, EPS, 32, norm_before_gate=False, norm_group_size=32),
        "fp8 groups of 32, norm groups of 16": registry.which_provider(
            "rms_norm_gated_fp8_group", x, gate, w, EPS, 32, norm_before_gate=False, norm_group_size=16),
        "fp8 groups of 32, gate after": registry.which_provider(
            "rms_norm_gated_fp8_group", x, gate, w, EPS, 32),
        "float64": registry.which_provider("rms_norm_gated", x.double(), gate.double(), None, EPS),
    }
    print("REPORT" + json.dumps({"results": results, "providers": providers}))


@pytest.fixture(scope="module")
def report():
    return interpreter_report(__file__, timeout=600)


def test_fused_kernel_is_the_composition_of_kernels(report):
    assert len(report["results"]) == 5 * len(_kernel_schemes()) + 1
    bad = [f"{r['name']}: {r['problems']}" for r in report["results"] if r["problems"]]
    assert not bad, "\n".join(bad)


def test_the_kernel_takes_the_groups_its_tiles_hold(report):
    assert report["providers"] == {
        "groups of 32": "triton", "groups of 24": "native", "one group of 96": "triton",
        "fp8 groups of 32, norm groups of 32": "triton", "fp8 groups of 32, norm groups of 16": "native",
        "fp8 groups of 32, gate after": "triton", "float64": "native"}


# --- the quant pass on transformers' gated norms ------------------------------------------------

transformers = pytest.importorskip("transformers")
qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def qwen_norm(h, dtype):
    return qwen3_next_gated_norm(h, dtype, EPS)


def mamba_norm(h, group, dtype):
    return mamba2_gated_norm(h, group, dtype, EPS)


def fp8_per_token(y):
    """vLLM's native per-token FP8 (the form that fuses after rms_norm)."""
    yf = y.float()
    scale = (yf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=MIN_SCALE)
    return (yf / scale).clamp(-448.0, 448.0).to(FP8), scale


def fp8_static(y, s):
    return (y.float() / s).clamp(-448.0, 448.0).to(FP8)


def fp8_per_group(y, g=32):
    """DeepSeek-V3 / vLLM reference per-group FP8, scales without keepdim."""
    groups = y.float().reshape(*y.shape[:-1], y.shape[-1] // g, g)
    s = (groups.abs().amax(-1) / 448.0).clamp(min=MIN_SCALE)
    return (groups / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(FP8).reshape(y.shape), s


class Gated(torch.nn.Module):
    """A transformers gated norm whose output is quantized (the next linear's input)."""

    def __init__(self, norm, quant):
        super().__init__()
        self.norm, self.quant = norm, quant

    def forward(self, x, gate, *extra):
        return self.quant(self.norm(x, gate), *extra)


SITES = [  # (id, norm, quantization, extra inputs, the fused op, its scheme arguments)
    ("qwen3_next_fp8_per_token", lambda h, dt: qwen_norm(h, dt), fp8_per_token, (),
     "rms_norm_gated_fp8_dynamic", {}),
    ("mamba2_groups_fp8_per_token", lambda h, dt: mamba_norm(h, 32, dt), fp8_per_token, (),
     "rms_norm_gated_fp8_dynamic", {}),
    ("qwen3_next_fp8_static", lambda h, dt: qwen_norm(h, dt), fp8_static, (torch.tensor(0.01),),
     "rms_norm_gated_fp8_static", {}),
    ("qwen3_next_fp8_per_group", lambda h, dt: qwen_norm(h, dt), fp8_per_group, (),
     "rms_norm_gated_fp8_group", {"group_size": 32}),
]


def fused_call(norm, name, x, gate, extra, qkw):
    """The fused op on the module's arguments (what the pass must have made of it)."""
    w = norm.weight.detach()
    if isinstance(norm, qwen3_next.Qwen3NextRMSNormGated):
        place = {}
    else:
        place = dict(norm_before_gate=False, norm_group_size=None if norm.group_size == x.shape[-1] else norm.group_size)
    return op(name)(x, gate, w, EPS, *extra, **qkw, **place)


@pytest.mark.parametrize("sid, make, quant, extra, fused, qkw", SITES, ids=[s[0] for s in SITES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transformers_gated_norm_and_quantization_fuse(sid, make, quant, extra, fused, qkw, dtype):
    m = Gated(make(96, dtype), quant)
    x, gate = randn(2, 3, 96, dtype=dtype), randn(2, 3, 96, dtype=dtype, scale=3.0)
    with torch.no_grad():
        c = compile_run(m, x, gate, *extra, options={"strict": True})
        want = m(x, gate, *extra)
        # the fused op's reference is the module's code bit for bit
        assert_bitwise_equal(fused_call(m.norm, fused, x, gate, extra, qkw), want)
    assert c.counts["gated_matched"] == 1 and c.counts["quant_matched"] == 1, c.counts
    assert c.counts["quant_unmatched"] == 0, c.counts
    assert c.ops("quant", "after") == {fused}
    assert len(c.kernels) == 1, c.kernels  # gate, norm, weight and quantization: one kernel
    got, want = (c.out, want) if isinstance(want, tuple) else ((c.out,), (want,))
    assert_close_q(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):  # scales: within y's rounding in x.dtype
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=1e-12)


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_forms  # noqa: E402  (the libraries' FP8 forms that fuse after rms_norm)


@pytest.mark.parametrize("form, norm_op, expected", quant_forms.FORMS,
                         ids=[f[0].__name__ for f in quant_forms.FORMS])
def test_library_fp8_forms_fuse_after_the_gated_norm(form, norm_op, expected):
    """Each library form that fuses after rms_norm (tests/test_quant_library_forms.py) fuses
    after transformers' Qwen3-Next gated norm too, with the same scheme arguments."""
    fused = "rms_norm_gated_" + registry.spec(norm_op).scheme_name
    m = Gated(qwen_norm(256, torch.bfloat16), form)
    x, gate = randn(5, 256, dtype=torch.bfloat16), randn(5, 256, dtype=torch.bfloat16, scale=3.0)
    with torch.no_grad():
        c = compile_run(m, x, gate, options={"strict": True})
        want = m(x, gate)
        got = fused_call(m.norm, fused, x, gate, (), expected)
    assert c.counts["quant_matched"] == 1 and c.ops("quant", "after") == {fused}, c.counts
    assert len(c.kernels) == 1, c.kernels
    assert_close_q(c.out[0], want[0])
    # the op, with the arguments the pass reads, is the library's arithmetic bit for bit
    assert_bitwise_equal(got[0].view(want[0].shape), want[0], nan_equal=True)
    assert_bitwise_equal(got[1].view(want[1].shape), want[1], nan_equal=True)


def test_quant_op_after_the_gated_op_fuses():
    def fn(x, gate, w):
        return torch.ops.compile_norm.quant_fp8_dynamic(compile_norm.rms_norm_gated(x, gate, w, EPS, False, 16))

    x, gate, w = gated_inputs((5, 64), torch.bfloat16)
    c = compile_run(fn, x, gate, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and c.ops("quant", "after") == {"rms_norm_gated_fp8_dynamic"}
    assert len(c.kernels) == 1
    assert_close_q(c.out[0], fn(x, gate, w)[0])


def test_gated_output_read_elsewhere_stays_unfused_with_a_reason():
    norm = qwen_norm(64, torch.bfloat16)

    def fn(x, gate):
        y = norm(x, gate)
        return fp8_per_token(y), y

    x, gate = randn(4, 64, dtype=torch.bfloat16), randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        c = compile_run(fn, x, gate, options={"strict": True})
        want = fn(x, gate)
    assert c.counts["gated_matched"] == 1 and c.counts.get("quant_matched", 0) == 0, c.counts
    assert c.counts.get("quant_unmatched: norm output has other users") == 1, c.counts
    assert c.ops("quant", "after") == {"rms_norm_gated"}
    assert_close_q(c.out[0][0], want[0][0])
    torch.testing.assert_close(c.out[1], want[1], rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "fp8_group", "int8_dynamic", "mxfp8"])
@pytest.mark.parametrize("pid, before, group", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_cuda_fused_kernel_is_the_composition_of_kernels(scheme, pid, before, group):
    """The composition but for the sum of squares: Triton lays out each kernel's registers
    on its own (the fused one also stores 1-byte codes), so a row's fp32 sum may be reduced
    in another order (run 23: 1-2 codes in 823K differ, one row's last rstd bit); checking's
    contract bounds that."""
    from compile_norm.kernels import checking, triton_ops

    kernel = {name: fn for name, (fn, _) in triton_ops.FUNCTIONS.items()}
    qkw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in scheme_kwargs(scheme, 4096).items()}
    x, gate, w = (t.cuda() for t in gated_inputs((3, 67, 4096), torch.bfloat16))
    group = group and scheme_group(scheme, x, qkw, 1024)
    name = f"rms_norm_gated_{scheme}"
    fused = kernel[name](x, gate, w, EPS, **qkw, norm_before_gate=before, norm_group_size=group)
    y = kernel["rms_norm_gated"](x, gate, w, EPS, before, group)
    composed = kernel[f"quant_{scheme}"](y, **qkw)
    res = checking.compare(name, fused, composed, torch.bfloat16, gate_before=not before)
    assert res.ok, res.problems


@pytest.mark.cuda
@pytest.mark.parametrize("lowering", ["kernel", "auto"])
def test_cuda_qwen3_next_gated_fp8_is_one_kernel(lowering):
    m = Gated(qwen_norm(4096, torch.bfloat16).cuda(), fp8_per_token)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    gate = 3 * torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        c = compile_run(m, x, gate, options={"strict": True, "lowering": lowering})
        want = m(x, gate)
        eager = fused_call(m.norm, "rms_norm_gated_fp8_dynamic", x, gate, (), {})
    assert c.counts["quant_matched"] == 1 and c.ops("quant", "after") == {"rms_norm_gated_fp8_dynamic"}
    assert "torch.ops.compile_norm." not in c.code
    assert lowering == "auto" or c.counts.get("lower_triton_kernel") == 1, c.counts
    if c.counts.get("lower_triton_kernel"):  # the Triton kernel: the eager kernel's bits
        assert "norm_quant_kernel" in c.code
        assert_bitwise_equal(c.out, eager)
    else:  # generated code (measured faster): gate, norm, weight and quantization, one kernel
        assert len(c.kernels) == 1, c.kernels
    assert_close_q(c.out[0], want[0])
    torch.testing.assert_close(c.out[1], want[1], rtol=TOL[torch.bfloat16], atol=1e-12)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    _child()
