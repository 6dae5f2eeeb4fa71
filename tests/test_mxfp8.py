"""MXFP8: the scheme against torchao's ``to_mx`` (bit for bit), its Triton kernel through the
interpreter, and the quant pass fusing a norm followed by torchao's own ``to_mx`` code."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, inductor_cpu_rounds_like_eager
from compile_helpers import compile_run_amax_left as run
from helpers import assert_bitwise_equal, interpreter_report

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

import compile_norm  # noqa: E402,F401
from compile_norm.ops.schemes import mxfp8  # noqa: E402

cn = torch.ops.compile_norm
FP8 = torch.float8_e4m3fn
MODES = ("floor", "ceil", "even", "rceil")


def edge_input(shape, dtype, seed=0, tiny=True):
    """Random rows at several magnitudes, plus blocks that are NaN, inf, zero, tiny or huge.

    The tiny block's values are normal numbers (the interpreter converts bf16 subnormals
    wrongly); ``tiny=False`` leaves it out (a norm output there is subnormal in x.dtype, where
    the kernel's last-bit rstd difference is a large relative one)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1, shape[-1])
    rows = flat.shape[0]
    flat[0 % rows] *= 1e-3
    flat[1 % rows, 5] = float("nan")
    flat[2 % rows, 40] = float("inf")
    flat[3 % rows, :32] = 0.0
    if tiny:  # amax / 448 subnormal: rceil's small codes, floor's clamped scale
        flat[4 % rows, 32:64] = 2.0 ** -120 * (1 + flat[4 % rows, 32:64].abs()) * flat[4 % rows, :32].sign()
    flat[5 % rows] *= 1e30
    flat[6 % rows, :32] = 2.0 ** torch.arange(-5, 27).float()  # exact powers of two
    return x.to(dtype)


def torchao_mx(x, mode, block=32):
    scales, q = mx_tensor.to_mx(x.contiguous(), FP8, block, ScaleCalculationMode(mode))
    return q, scales


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 256), (2, 4, 96)])
def test_reference_equals_torchao_to_mx(mode, dtype, shape):
    x = edge_input(shape, dtype)
    got = cn.quant_mxfp8(x, scaling_mode=mode)
    assert got[1].dtype == torch.float8_e8m0fnu and got[1].shape == (*shape[:-1], shape[-1] // 32)
    assert_bitwise_equal(got, torchao_mx(x, mode), nan_equal=True)


def test_reference_block_size_fp16_and_strided_input():
    x = edge_input((7, 256), torch.float32)
    assert_bitwise_equal(cn.quant_mxfp8(x, block_size=64), torchao_mx(x, "floor", 64), nan_equal=True)
    h = edge_input((7, 128), torch.float16)  # fp16 values are exact in fp32: same as torchao on x.float()
    assert_bitwise_equal(cn.quant_mxfp8(h, scaling_mode="rceil"), torchao_mx(h.float(), "rceil"), nan_equal=True)
    s = edge_input((7, 512), torch.bfloat16)[:, ::2]  # non-contiguous rows
    assert_bitwise_equal(cn.quant_mxfp8(s), torchao_mx(s, "floor"), nan_equal=True)
    q, scales = cn.quant_mxfp8(torch.randn(0, 64))
    assert q.shape == (0, 64) and scales.shape == (0, 2)


def test_fused_ops_equal_the_composition():
    x, r = edge_input((5, 96), torch.bfloat16), torch.randn(5, 96).bfloat16()
    w = torch.randn(96).bfloat16()
    want = cn.quant_mxfp8(cn.rms_norm(x, w, 1e-6), 32, "rceil")
    assert_bitwise_equal(cn.rms_norm_mxfp8(x, w, 1e-6, scaling_mode="rceil"), want, nan_equal=True)
    y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
    got = cn.fused_add_rms_norm_mxfp8(x, r, w, 1e-6)
    assert_bitwise_equal(got, (*cn.quant_mxfp8(y), h), nan_equal=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=30), "block_size=30 must divide the hidden size"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(scaling_mode="nearest"), "scaling_mode must be one of ['ceil', 'even', 'floor', 'rceil'], got 'nearest'"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=r"compile_norm\.rms_norm_mxfp8: " + message.replace("[", r"\[").replace("]", r"\]")):
        compile_norm.ops.rms_norm_mxfp8(torch.randn(2, 96), None, 1e-6, **kwargs)


# --- the kernel, through the Triton interpreter (a child process: see test_kernels_interpret.py)


def _child() -> None:
    from compile_norm.kernels import checking, triton_ops
    from compile_norm.ops import registry

    assert triton_ops.INTERPRET and triton_ops.SUPPORTED, triton_ops.REASON
    results = []
    kernel = {n: registry.providers(n)["triton"].fn for n in ("quant_mxfp8", "rms_norm_mxfp8")}
    for mode in MODES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            # 1400 columns: three tiles (1024 + 256 + 128) of blocks, the last one masked
            for shape in ((7, 1408), (2, 3, 96)) if dtype == torch.bfloat16 else ((2, 3, 96),):
                x = edge_input(shape, dtype)
                for block in (32, 64) if shape[-1] == 1408 else (32,):
                    ref = registry.ops()["quant_mxfp8"].reference(x, block, mode)
                    got = kernel["quant_mxfp8"](x, block, mode)
                    try:
                        assert_bitwise_equal(got, ref, nan_equal=True)
                        problems = []
                    except AssertionError as e:
                        problems = [str(e)]
                    results.append({"name": f"quant {mode} {dtype} {shape} bs={block}", "problems": problems})
                w = torch.randn(shape[-1]).to(dtype)
                args = (edge_input(shape, dtype, tiny=False), w, 1e-6, 32, mode, 0.0, None)
                res = checking.compare("rms_norm_mxfp8", kernel["rms_norm_mxfp8"](*args),
                                       registry.ops()["rms_norm_mxfp8"].reference(*args), dtype)
                results.append({"name": f"rms_norm {mode} {dtype} {shape}", "problems": res.problems})
    print("REPORT" + json.dumps({"results": results}))


@pytest.fixture(scope="module")
def report():
    return interpreter_report(__file__, timeout=600)


def test_interpreter_kernel_reproduces_the_reference(report):
    assert len(report["results"]) == 4 * (5 + 2 + 2)  # modes x (bf16: 3 quant + 2 norm, fp16, fp32)
    bad = [f"{r['name']}: {r['problems']}" for r in report["results"] if r["problems"]]
    assert not bad, "\n".join(bad)


# --- the quant pass: torchao's to_mx after a norm, as Dynamo traces it


def norm_to_mx(x, r, w, mode):
    y = cn.rms_norm(x, w, 1e-6)
    scales, q = mx_tensor.to_mx(y, FP8, 32, ScaleCalculationMode(mode))
    return q, scales


def add_norm_to_mx(x, r, w, mode):
    y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
    scales, q = mx_tensor.to_mx(y, FP8, 32, ScaleCalculationMode(mode))
    return q, scales, h


FUSE_CASES = [  # (mode, residual, dtype, shape)
    ("floor", False, torch.bfloat16, (5, 96)),
    ("floor", True, torch.float32, (2, 3, 64)),
    ("ceil", True, torch.bfloat16, (5, 96)),
    ("rceil", False, torch.bfloat16, (5, 96)),
    ("rceil", True, torch.float32, (2, 3, 64)),
]


@pytest.mark.parametrize("mode, residual, dtype, shape", FUSE_CASES)
def test_torchao_to_mx_after_a_norm_fuses(mode, residual, dtype, shape):
    x, r = edge_input(shape, dtype), torch.randn(shape).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    fn = add_norm_to_mx if residual else norm_to_mx
    c, amax = run(fn, x, r, w, mode, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and c.counts["quant_unmatched"] == 0, c.counts
    assert c.ops("quant", "after") == {"fused_add_rms_norm_mxfp8" if residual else "rms_norm_mxfp8"}
    assert not amax, "the hand-written amax reduction survived the quant pass"
    assert_bitwise_equal(c.out, fn(x, r, w, mode), nan_equal=True)  # eager torchao, clamp included


def test_torchao_to_mx_fuses_with_dynamic_tokens():
    x, w = torch.randn(6, 128).bfloat16(), torch.randn(128).bfloat16()
    torch._dynamo.mark_dynamic(x, 0)
    c, amax = run(norm_to_mx, x, None, w, "floor", options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    assert_bitwise_equal(c.out, norm_to_mx(x, None, w, "floor"), nan_equal=True)


def floor_mx(y, max_pow2=8):
    """to_mx's floor mode written out, with e4m3's largest power of two as a parameter."""
    b = y.float().reshape(*y.shape[:-1], y.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    e = ((amax.view(torch.int32) >> 23) & 255) - 127
    code = (torch.clamp(e - max_pow2, -127, 128) + 127).to(torch.uint8)
    code = torch.where(torch.isnan(amax), 255, code)
    scale = torch.clamp((code.to(torch.int32) << 23).view(torch.float32), min=2.0 ** -126)
    q = (b / scale).clamp(-448.0, 448.0).to(FP8).reshape(y.shape)
    return q, code


def hand_floor(x, r, w, max_pow2):
    return floor_mx(cn.rms_norm(x, w, 1e-6), max_pow2)


def hand_floor_norm_reused(x, r, w, max_pow2):
    y = cn.rms_norm(x, w, 1e-6)
    return (*floor_mx(y, max_pow2), y * 2)


def test_hand_written_floor_with_keepdim_fuses_and_returns_uint8_codes():
    x, w = edge_input((4, 128), torch.float32), torch.randn(128)
    c, amax = run(hand_floor, x, None, w, 8, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    assert c.out[1].dtype == torch.uint8 and c.out[1].shape == (4, 4, 1)
    assert_bitwise_equal(c.out, hand_floor(x, None, w, 8), nan_equal=True)


@pytest.mark.parametrize("fn, max_pow2, reason", [
    (hand_floor, 7, "MX floor constant max_pow2=7 differs from 8"),
    (hand_floor_norm_reused, 8, "norm output has other users"),
])
def test_look_alikes_stay_unfused_with_a_reason(fn, max_pow2, reason):
    x, w = torch.randn(4, 128), torch.randn(128)
    c, amax = run(fn, x, None, w, max_pow2, options={"strict": True})
    assert c.counts.get("quant_matched", 0) == 0, c.counts
    assert c.counts.get(f"quant_unmatched: {reason}") == 1, c.counts
    assert amax and c.ops("quant", "after") == {"rms_norm"}
    # unfused, the norm is generated code: its rstd may differ from eager's in the last bit
    want = fn(x, None, w, max_pow2)
    assert_close_q(c.out[0], want[0])
    assert torch.equal(c.out[1], want[1])
    for got, ref in zip(c.out[2:], want[2:]):
        assert_close(got, ref, torch.float32)


def test_benchmark_dry_run_fuses_every_family(tmp_path):
    """benchmarks/new_schemes.py on the CPU: the HF-style norm + torchao's to_mx, and the
    transformers gated norms (alone and + per-token FP8), fuse."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import new_schemes

    assert new_schemes.main(["--dry-run", "--shapes", "3x2048", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "new_schemes.json").read_text())["rows"]
    mine = {(r["family"], r["candidate"]): r for r in rows}
    for fam in new_schemes.FAMILIES:
        assert mine[(fam, "compile_norm eager")]["check"] == "ok"
        cn_row = mine[(fam, "compile_norm")]
        assert cn_row["fusion"].get("canonicalize_matched") == 1, cn_row["fusion"]
        if fam == "rms_fp8_tensor":
            # not matched by the quant pass (issue 13 part A): generated code, whose float32
            # y (no x.dtype rounding) may move some codes a step (flagged, as stock's)
            continue
        # torch 2.11's CPU code keeps float32 between the generated gated norm's pointwise
        # ops (compile_helpers.inductor_cpu_rounds_like_eager): its values may differ there
        assert cn_row["check"] == "ok" or not inductor_cpu_rounds_like_eager(), cn_row
        fused_by = {"gated_matched"} if fam.startswith("gated_") else {"quant_matched"}
        if fam.endswith("_fp8"):  # the gated norm and its quantization: rms_norm_gated_fp8_dynamic
            fused_by.add("quant_matched")
        assert all(cn_row["fusion"].get(n) == 1 for n in fused_by), cn_row["fusion"]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(64, 5376), (3, 7, 4096)])
def test_cuda_kernel_quantization_is_bitwise(mode, shape):
    from compile_norm.ops import registry

    x = edge_input(shape, torch.bfloat16).cuda()
    got = registry.providers("quant_mxfp8")["triton"].fn(x, 32, mode)
    assert_bitwise_equal(got, registry.ops()["quant_mxfp8"].reference(x, 32, mode), nan_equal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_cuda_torchao_to_mx_fuses_and_matches(mode):
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    c, amax = run(norm_to_mx, x, None, w, mode, options={"strict": True})
    assert c.counts["quant_matched"] == 1 and not amax, c.counts
    q, s = c.out
    q_ref, s_ref = cn.rms_norm_mxfp8(x.cpu(), w.cpu(), 1e-6, scaling_mode=mode)
    # the kernel's rstd may differ from ATen's in its last bits: codes within one step
    from compile_norm.kernels import checking
    res = checking.compare("rms_norm_mxfp8", (q.cpu(), s.cpu()), (q_ref, s_ref), torch.bfloat16)
    assert res.ok, res.problems


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    _child()
