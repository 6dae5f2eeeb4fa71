"""The dynamic FP8 quantizers of the libraries users run, after a compile_norm norm: each
fuses into one norm + quant op whose arguments carry the library's scale arithmetic, and the
compiled results equal the eager function (the op with the arguments read from the graph
reproduces the eager codes and scales bit for bit; the compiled graph within Inductor's
rounding of the norm output).

The forms live in benchmarks/quant_forms.py (which times them): vLLM is not installable here,
so its forms are written out as vLLM computes them (the file and function each mirrors is
named); DeepSeek-V3's ``act_quant`` is a Triton kernel, its torch form is written the same way. torchao (installed) runs for real in test_torchao_float8.py.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, cn, compile_run
from helpers import assert_bitwise_equal

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_forms  # noqa: E402  (the forms, as the benchmark times them)

FP8, FP8_MAX = quant_forms.FP8, quant_forms.FP8_MAX


def after_norm(form):
    def fn(x, w):
        return form(cn.rms_norm(x, w, 1e-6))
    fn.__name__ = form.__name__
    return fn


def fp32_inverse(x, w):
    """An inverse scale computed in float32: 448 / amax rounds twice (reciprocal, multiply)."""
    y = cn.rms_norm(x, w, 1e-6)
    scale = FP8_MAX / y.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    return (y.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


FORMS = [(after_norm(form), op, args) for form, op, args in quant_forms.FORMS]


def _close_q(got, want):
    """FP8 codes within one step, NaN (a zero token without a minimum scale) where eager has it."""
    nan = want.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    zero = torch.zeros((), dtype=want.dtype)
    assert_close_q(torch.where(nan, zero, got), torch.where(nan, zero, want))


@pytest.mark.parametrize("form, fused_op, expected", FORMS, ids=[f[0].__name__ for f in FORMS])
@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (5, 256)), (torch.float16, (2, 3, 384))])
def test_library_form_fuses_bit_for_bit(form, fused_op, expected, dtype, shape):
    if form.__name__ == "vllm_per_token_group" and len(shape) == 3:
        shape = (6, shape[-1])  # vLLM flattens the tokens before its group view
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    x[0] = 0.0  # an all-zero token: the minimum (or its absence) decides its scale
    c = compile_run(form, x, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {fused_op}
    # one kernel, per tensor too: a whole-tensor amax needs every row before any row is
    # quantized, so a GPU needs two launches at least (kernels/two_pass.py gives two); the
    # CPU's C++ kernel runs its loop nests one after another (per tensor: sums of squares,
    # amax, quantize, each reading x)
    assert len(c.kernels) == 1, c.kernels
    want = form(x, w)
    # Inductor's generated norm keeps float32 where eager rounds y to x.dtype: codes within
    # one step, scales within y's rounding
    _close_q(c.out[0], want[0])
    assert_close(c.out[1], want[1], dtype)
    # the op, with the arguments the pass read, is the library's arithmetic bit for bit
    op = getattr(torch.ops.compile_norm, fused_op)
    got = op(x, w, 1e-6, **expected)
    assert_bitwise_equal(got[0].view(want[0].shape), want[0], nan_equal=True)
    assert_bitwise_equal(got[1].view(want[1].shape), want[1], nan_equal=True)


PER_TENSOR = [f for f in FORMS if f[1].endswith("_tensor")]


@pytest.mark.cuda
@pytest.mark.parametrize("form, fused_op, expected", PER_TENSOR, ids=[f[0].__name__ for f in PER_TENSOR])
def test_cuda_per_tensor_form_fuses(form, fused_op, expected):
    """On the GPU: fused, codes within one step of eager, the op with the read arguments (the
    two-pass provider) equal to the form on its own norm output within one step, and never
    more generated kernels than stock compile of the same code (the site is inlined: the
    two-pass kernels serve eager calls)."""
    x = torch.randn(64, 5376, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5376, device="cuda", dtype=torch.bfloat16)
    c = compile_run(form, x, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1, c.counts
    assert c.ops("quant", "after") == {fused_op}
    stock = compile_run(form, x, w, backend="inductor")
    assert len(c.kernels) <= len(stock.kernels), (c.kernels, stock.kernels)
    want = form(x, w)
    _close_q(c.out[0], want[0])
    assert_close(c.out[1], want[1], torch.bfloat16)
    got = getattr(torch.ops.compile_norm, fused_op)(x, w, 1e-6, **expected)
    _close_q(got[0], want[0])
    assert_close(got[1].view(want[1].shape), want[1], torch.bfloat16)


def fp32_inverse_per_tensor(x, w):
    """torchao's tensorwise inverse scale computed in float32 instead of float64."""
    y = cn.rms_norm(x, w, 1e-6)
    scale = FP8_MAX / torch.clamp(torch.max(torch.abs(y.float())), min=1e-12)
    return (y.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@pytest.mark.parametrize("form", [fp32_inverse, fp32_inverse_per_tensor])
def test_float32_inverse_scale_is_refused_with_a_reason(form):
    x, w = torch.randn(4, 256), torch.randn(256)
    c = compile_run(form, x, w, options={"strict": True})
    assert c.counts.get("quant_matched", 0) == 0
    reasons = [k for k in c.counts if k.startswith("quant_unmatched: ")]
    assert reasons and all(k.startswith("quant_unmatched: the inverse scale is computed in "
                                        "float32") for k in reasons), c.counts
    q, scale = form(x, w)  # left to Inductor, whose 448 / amax is its own
    assert_close_q(c.out[0], q)
    assert_close(c.out[1], scale, torch.float32)


def test_inverse_scale_float32_equals_torchaos_float64():
    # The kernel's float32 448 / amax against torchao's float64 448 * (1 / amax): every
    # float32 of one binade, scaled to the extremes, and subnormals.
    a = (torch.arange(2 ** 23, dtype=torch.int32) + (127 << 23)).view(torch.float32)
    for values in (a, a * 2.0 ** -100, a * 2.0 ** 100, a[1:] * 2.0 ** -149 / 2.0 ** -149 * 2.0 ** -140):
        wide = (FP8_MAX * torch.reciprocal(values.double())).float()
        narrow = torch.tensor(FP8_MAX) / values
        assert torch.equal(wide.view(torch.int32), narrow.view(torch.int32))


def test_benchmark_dry_run_fuses_every_form(tmp_path):
    # benchmarks/quant_forms.py on the CPU: the Hugging Face norm + each form, both compiles
    assert quant_forms.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quant_forms.json").read_text())
    ours = [r for r in rows if r["candidate"] == "compile_norm"]
    assert len(ours) == len(quant_forms.FORMS)
    assert all(r["fusion"].get("quant_matched") == 1 for r in ours), ours
    assert all(not r["fusion"] for r in rows if r["candidate"] == "stock compile")


def torchao_per_tensor_primitives(y):
    """torchao's own per-tensor primitives, as Float8DynamicActivationFloat8WeightConfig
    (PerTensor) calls them: block_size = y.shape; at batch 1 ([1, T, H]) the amax reduces
    dims 1 and 2 only (the size-1 dim is left out)."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    scale = _choose_scale_float8(y, list(y.shape), FP8)
    return _quantize_affine_float8(y, scale, FP8), scale


@pytest.mark.parametrize("shape", [(1, 7, 384), (2, 7, 384), (7, 384)])
def test_torchao_per_tensor_primitives_fuse_at_every_batch_size(shape):
    x, w = torch.randn(shape, dtype=torch.bfloat16), torch.randn(shape[-1], dtype=torch.bfloat16)
    form = after_norm(torchao_per_tensor_primitives)
    c = compile_run(form, x, w, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and c.counts["quant_unmatched"] == 0, c.counts
    assert c.ops("quant", "after") == {"rms_norm_fp8_dynamic_tensor"}
    want = form(x, w)
    _close_q(c.out[0], want[0])
    assert c.out[1].shape == want[1].shape
    assert_close(c.out[1], want[1], torch.bfloat16)
    got = torch.ops.compile_norm.rms_norm_fp8_dynamic_tensor(x, w, 1e-6, min_scale=None, scale_in_x_dtype=True)
    assert_bitwise_equal(got[0], want[0])
    assert_bitwise_equal(got[1].view(want[1].shape), want[1])


def test_per_token_amax_of_one_token_stays_per_token():
    """amax over the last dim of a one-token [1, H] is per-token, not per-tensor: the per-token
    scheme (one pass) keeps it."""
    x, w = torch.randn(1, 384, dtype=torch.bfloat16), torch.randn(384, dtype=torch.bfloat16)
    c = compile_run(after_norm(quant_forms.vllm_per_token), x, w, options={"strict": True})
    assert c.ops("quant", "after") == {"rms_norm_fp8_dynamic"}, c.counts
