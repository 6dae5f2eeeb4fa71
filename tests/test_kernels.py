"""Triton providers: registration, supports rules, and numerics against the reference on CUDA.

Numerics use compile_norm.kernels.checking (tolerances derived in its docstring: out within
1 ulp of x.dtype, 2 with a 16-bit weight applied Llama-style, <= 1% of elements differing at
all, residual_out bit-exact, FP8 codes within one FP8 step, scales rtol 1e-6 for quant-only
ops). The same checks run on CPU
through the Triton interpreter in test_kernels_interpret.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import compile_norm  # noqa: F401
from compile_norm.kernels import checking, triton_ops
from compile_norm.ops import registry

OPS = checking.all_ops()


def test_every_op_has_a_triton_provider():
    # 2 norms + 7 schemes with a kernel x (quant, norm, add + norm, gated norm) + the gated norm
    assert len(OPS) == 31
    for op in OPS:
        p = registry.providers(op)["triton"]
        assert p.rank == triton_ops.RANK and p.source == triton_ops.SOURCE and len(p.source) == 64
        assert p.supported == triton_ops.SUPPORTED
        if not p.supported:
            assert p.reason and registry.unsupported_reasons(op)["triton"] == p.reason


def test_cpu_only_import_does_not_need_triton():
    code = (
        "import sys, torch, compile_norm\n"
        "from compile_norm.kernels import triton_ops\n"
        "assert torch.cuda.is_available() or 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_import_without_triton_registers_unsupported_providers():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, compile_norm\n"
        "from compile_norm import ops\n"
        "r = ops.unsupported_reasons('rms_norm_fp8_group')['triton']\n"
        "assert 'triton is not importable' in r, r\n"
        "x = torch.randn(3, 8)\n"
        "assert ops.which_provider('rms_norm', x, None, 1e-6) == 'native'\n"
        "torch.ops.compile_norm.rms_norm(x, None, 1e-6)\n"
        "print('ok')\n"
    )
    # TRITON_INTERPRET makes the import be attempted even without a GPU.
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(triton_ops.INTERPRET, reason="CPU tensors are accepted when interpreting")
def test_supports_rejects_cpu_tensors():
    x = torch.randn(4, 64)
    fn, supports = triton_ops.FUNCTIONS["rms_norm"]
    assert not supports(x, None, 1e-6, 0.0, None)
    assert not triton_ops.FUNCTIONS["quant_int8_dynamic"][1](x)


@pytest.mark.parametrize("op, shape, kwargs, wide", [
    ("rms_norm", (8192, 4096), {}, False),
    ("rms_norm", (524288, 4096), {}, True),  # 2**31 elements: rows of H pass int32
    ("rms_norm", (524287, 4096), {}, False),  # the last row ends at 2**31 - 4096
    ("rms_norm", (9, 4096), {"stride": 2 ** 28}, True),  # a strided view: row 8 starts at 2**31
    ("rms_norm", (8, 4096), {"stride": 2 ** 28}, False),
    ("rms_norm_fp8_group", (262144, 4096), {"group_size": 128, "column_major_scales": True}, False),
    ("rms_norm_fp8_group", (2 ** 26, 64), {"group_size": 32, "column_major_scales": True}, True),
])
def test_row_offsets_are_32_bit_unless_one_may_pass_int32(op, shape, kwargs, wide):
    """The kernel's row offsets are int32 (fewer address instructions) unless an offset of
    some tensor it touches reaches 2**31; meta tensors: no memory is allocated."""
    stride = kwargs.pop("stride", None)
    t, h = shape
    if stride:
        x = torch.empty_strided(shape, (stride, 1), device="meta", dtype=torch.bfloat16)
    else:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    w = torch.empty(h, device="meta", dtype=torch.bfloat16)
    spec = registry.spec(op)
    args = checking.positional(op, (x, w, 1e-6), kwargs)
    launch = triton_ops.prepare(spec, args)
    assert launch.const_kwargs()["OFFSETS_64"] is wide


def test_launch_config_heuristic():
    # several rows per program for small rows, one row (whole row in registers) for big ones;
    # programs_per_sm is 0: one-shot grid, the persistent variant is off; early_loads None:
    # the default load schedule
    assert triton_ops.launch_config(128, 0) == (16, ((1, 128), (0, 1), (0, 1)), 4, 0, None)
    # non-power-of-two rows: up to three power-of-two tiles instead of one padded tile
    assert triton_ops.column_tiles(5376, 0) == (4096, 1024, 256)
    assert triton_ops.column_tiles(2304, 0) == (2048, 256)
    assert triton_ops.column_tiles(3000, 0) == (2048, 512, 512)
    assert triton_ops.column_tiles(4095, 0) == (4096,)  # < 10% padding: one tile
    assert triton_ops.column_tiles(300, 0) == (512,)  # small rows: one tile
    assert triton_ops.launch_config(5376, 0) == (1, ((1, 4096), (1, 1024), (1, 256)), 4, 0, None)
    # per-group FP8 splits the same way, tiles a whole number of groups
    assert triton_ops.launch_config(2304, 128).tiles == ((16, 128), (2, 128), (0, 1))
    assert triton_ops.launch_config(5376, 128) == (1, ((32, 128), (8, 128), (2, 128)), 4, 0, None)
    assert triton_ops.launch_config(4096, 128) == (1, ((32, 128), (0, 1), (0, 1)), 8, 0, None)
    assert triton_ops.launch_config(65536, 0).num_warps == 32
    # a kernel reducing an amax: ~1K lanes per warp on one tile too (16 values per thread without)
    assert [triton_ops.launch_config(h, 0).num_warps for h in (2048, 4096, 8192)] == [4, 8, 16]
    assert [triton_ops.launch_config(h, 0, True).num_warps for h in (2048, 4096, 8192)] == [4, 4, 8]
    x = torch.empty(2, 4096)
    keys = {op: triton_ops.launch_key(registry.spec(op), registry.spec(op).bind(args, {}))
            for op, args in (("rms_norm", (x, None, 1e-6)), ("rms_norm_fp8_static", (x, None, 1e-6, torch.ones(()))),
                             ("rms_norm_int8_dynamic", (x, None, 1e-6)), ("rms_norm_fp8_group", (x, None, 1e-6, 128)),
                             ("fused_add_rms_norm_fp8_dynamic", (x, x, None, 1e-6)))}
    assert keys == {"rms_norm": (0, False), "rms_norm_fp8_static": (0, False), "rms_norm_int8_dynamic": (0, True),
                    "rms_norm_fp8_group": (128, True), "fused_add_rms_norm_fp8_dynamic": (0, True)}
    assert triton_ops.launch_config(4096, 128, True) == (1, ((32, 128), (0, 1), (0, 1)), 4, 0, None)
    assert triton_ops.launch_config(5376, 0, True) == triton_ops.launch_config(5376, 0)  # split: as before
    assert triton_ops.launch_config(128, 0, True) == triton_ops.launch_config(128, 0)
    for h in range(1, 9000, 7):  # tiles cover the row, group-aligned, powers of two
        for g in (0, 64, 128):
            if g and h % g:
                continue
            t = [w for w in triton_ops.column_tiles(h, g)]
            assert sum(t) >= h and all(w & (w - 1) == 0 and w % max(g, 1) == 0 for w in t)
            assert sum(t[:-1]) < h


# --- CUDA ------------------------------------------------------------------------------------

# Every op on the main shapes; the variants (also run for every op in the interpreter) on
# one op per family, to keep the number of distinct kernels to compile (~170) small.
_VARIANT_OPS = ["rms_norm", "fused_add_rms_norm", "quant_fp8_group", "quant_int8_static",
                "rms_norm_gated", "rms_norm_gated_fp8_dynamic"] + [
    f"fused_add_rms_norm_{s}" for s in ("fp8_static", "fp8_dynamic", "fp8_group", "int8_static",
                                        "int8_dynamic", "int8_dynamic_asym")
]
CUDA_CASES = checking.default_cases(
    dtypes=(torch.bfloat16,), hiddens=(128, 2304, 3000, 5376), tokens=37, variants=False
) + checking.default_cases(
    dtypes=(torch.float16, torch.float32), hiddens=(4096,), tokens=37, variants=False
)
for _op in _VARIANT_OPS:  # [1:] drops the op's main case (one dtype, one hidden)
    _h = 2304 if "fp8_group" in _op else 3000
    CUDA_CASES += checking.default_cases((torch.bfloat16,), (_h,), tokens=37, ops=[_op])[1:]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.name() for c in CUDA_CASES])
def test_matches_reference_cuda(case):
    res = checking.run_case(case, "cuda")
    assert res.ok, f"{res.name}: {res.problems} errors={res.errors} mismatch={res.mismatch}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", [
    checking.Case("rms_norm", (4099, 8192), torch.bfloat16),
    checking.Case("fused_add_rms_norm_fp8_dynamic", (1000, 65536), torch.float32),
    checking.Case("rms_norm_fp8_group", (513, 7168), torch.bfloat16, column_major=True, ue8m0=True),
    checking.Case("rms_norm", (5, 64, 128), torch.bfloat16, layout="strided"),  # QK norm
    checking.Case("fused_add_rms_norm_int8_dynamic_asym", (1, 4096), torch.float16),
    # Mamba-2 (d_inner 8192, groups of 1024), Qwen3-Next (per-head rows of 128) + FP8
    checking.Case("rms_norm_gated", (1000, 8192), torch.bfloat16, gate_before=True, norm_group=1024),
    checking.Case("rms_norm_gated_fp8_dynamic", (4099, 128), torch.bfloat16),
    checking.Case("rms_norm_gated_fp8_group", (513, 7168), torch.bfloat16, gate_before=True,
                  norm_group=128, column_major=True),
], ids=lambda c: c.name())
def test_large_and_edge_shapes_cuda(case):
    res = checking.run_case(case, "cuda")
    assert res.ok, f"{res.name}: {res.problems} errors={res.errors}"


def cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (profiled)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_eager_call_is_one_kernel_launch(op):
    case = checking.Case(op, (64, 4096), torch.bfloat16)
    args, kwargs = checking.build_call(case, "cuda")
    fn = getattr(torch.ops.compile_norm, op)
    assert registry.which_provider(op, *args, **kwargs) == "triton"
    fn(*args, **kwargs)  # compile outside the profile
    kernels = cuda_kernels(lambda: fn(*args, **kwargs))
    assert len(kernels) == 1, kernels


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm_fp8_group"])
def test_public_callable_is_one_kernel_launch_and_the_torch_op(op):
    """The public callable skips the dispatcher but runs the same kernel, bit for bit."""
    case = checking.Case(op, (64, 4096), torch.bfloat16)
    args, kwargs = checking.build_call(case, "cuda")
    public = getattr(compile_norm.ops, op)
    got, want = public(*args, **kwargs), getattr(torch.ops.compile_norm, op)(*args, **kwargs)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) if g.dtype == torch.float8_e4m3fn \
            else torch.equal(g, w)
    kernels = cuda_kernels(lambda: public(*args, **kwargs))
    assert len(kernels) == 1, kernels


@pytest.mark.cuda
@pytest.mark.skipif(not triton_ops.FAST_LAUNCH, reason="the cached-kernel route is off for this Triton")
def test_fast_launch_key_follows_tritons_specialization():
    """The eager route caches compiled kernels under our copy of Triton's specialization
    rule (triton_ops.specialization_key). Wherever Triton's own cache hands out different
    compiled kernels, our keys must differ too, or a call would run a kernel specialized for
    other arguments. Fails when Triton changes its rule."""
    spec = registry.spec("fused_add_rms_norm")
    kernel = triton_ops.K.norm_quant_kernel
    base = torch.randn(64 * 4200 + 64, device="cuda", dtype=torch.bfloat16)

    def rows(t, h, stride, offset=0):
        return base[offset:offset + t * stride].view(t, stride)[:, :h]

    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    calls = [
        (rows(5, 4096, 4096), rows(5, 4096, 4096, 64)),
        (rows(7, 4096, 4096), rows(7, 4096, 4096)),  # other token count
        (rows(5, 4096, 4112), rows(5, 4096, 4096)),  # x row stride % 16 == 0
        (rows(5, 4096, 4104), rows(5, 4096, 4096)),  # x row stride % 16 != 0
        (rows(5, 4096, 4096, 8), rows(5, 4096, 4096)),  # x 16-byte aligned at an offset
        (rows(5, 4096, 4096), rows(5, 4096, 4100)),  # residual stride % 16 != 0
    ]
    seen = []
    for x, r in calls:
        launch = triton_ops.prepare(spec, (x, r, w, 1e-6, 0.0, None))
        compiled = kernel.warmup(*launch.args, **launch.const_kwargs(),
                                 num_warps=launch.num_warps, grid=(launch.grid0,))
        seen.append((triton_ops.specialization_key(launch.args), compiled))
    assert len({id(c) for _, c in seen}) > 1  # the cases do reach different specializations
    for key_a, comp_a in seen:
        for key_b, comp_b in seen:
            if comp_a is not comp_b:
                assert key_a != key_b
    misaligned = rows(5, 4096, 4096, 1)  # 2 bytes off: the public launch takes it
    launch = triton_ops.prepare(spec, (misaligned, misaligned, w, 1e-6, 0.0, None))
    assert triton_ops.specialization_key(launch.args) is None


@pytest.mark.cuda
def test_supports_rules_cuda():
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    assert registry.which_provider("rms_norm", x, w, 1e-6) == "triton"
    assert registry.which_provider("rms_norm", x.double(), w.double(), 1e-6) == "native"
    assert registry.which_provider("rms_norm", x, w.double(), 1e-6) == "native"
    assert registry.which_provider("rms_norm", x, w.float(), 1e-6) == "triton"  # exact
    big = torch.randn(2, 65536 * 2, device="cuda", dtype=torch.bfloat16)
    assert registry.which_provider("rms_norm", big, None, 1e-6) == "native"
    assert registry.which_provider("quant_fp8_group", x, group_size=128) == "triton"
    x96 = torch.randn(4, 288, device="cuda")
    assert registry.which_provider("quant_fp8_group", x96, group_size=96) == "native"
    assert registry.which_provider("quant_fp8_group", x96, group_size=32) == "triton"
    # zero tokens: empty outputs with the fake's layout, no launch needed
    e = torch.empty(0, 256, device="cuda", dtype=torch.bfloat16)
    q, s = torch.ops.compile_norm.rms_norm_fp8_group(e, w, 1e-6, column_major_scales=True)
    assert q.shape == (0, 256) and s.shape == (0, 2)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm_fp8_dynamic", "rms_norm_fp8_group",
                                "rms_norm_int8_dynamic_asym", "quant_fp8_static"])
def test_cached_launch_matches_reference_cuda(op):
    # The second call with the same configuration launches the cached compiled kernel
    # directly (no JITFunction.run): it must see its new arguments (pointers, sizes).
    triton_ops._LAUNCHERS.clear()
    for i, shape in enumerate([(37, 2304), (5, 2304), (64, 2304)]):
        res = checking.run_case(checking.Case(op, shape, torch.bfloat16), "cuda", seed=i)
        assert res.ok, f"call {i}: {res.name}: {res.problems}"
        assert len(triton_ops._LAUNCHERS) == 1


@pytest.mark.cuda
def test_static_scales_divide_as_the_reference_cuda():
    """The kernel's quotient (x * (1/s) with one fma correction, no per-element copysign)
    against the reference's IEEE division, bit for bit: scales whose reciprocal is inexact,
    tiny ones (quotients overflow: the NaN guard), ones outside the normal range and negative
    ones (both the exact branch), on fp32 and bf16 x holding zeros of both signs,
    infinities, NaN, subnormals and values near the largest float."""
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([0.0, -0.0, inf, -inf, nan, 3e38, -3e38, 1e-40, -1e-40, 1e-45,
                             447.0, -460.0, 126.5, -127.5])
    x = torch.randn(64, 256) * 10.0 ** torch.randint(-6, 7, (64, 1)).float()
    x[:, :specials.numel()] = specials
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype).cuda()
        for s in (3.7 / 448, 1 / 3, 0.9, 1e-30, 2e-38, 5e37, 1e38, -0.02, 1.0):
            scale = torch.tensor(s, device="cuda")
            for op in ("quant_fp8_static", "quant_int8_static"):
                got = triton_ops.FUNCTIONS[op][0](xs, scale).cpu()
                want = registry.ops()[op].reference(xs, scale).cpu()
                both_nan = torch.zeros(got.shape, dtype=torch.bool)
                if got.dtype == torch.float8_e4m3fn:  # NaN codes: 0x7f, 0xff
                    both_nan = got.float().isnan() & want.float().isnan()
                    got, want = got.view(torch.uint8), want.view(torch.uint8)
                bad = ((got != want) & ~both_nan).nonzero()[:8].tolist()
                assert not bad, f"{op} {dtype} scale {s}: " + ", ".join(
                    f"x={xs[i, j].item()!r}: kernel {got[i, j].item()} reference {want[i, j].item()}"
                    for i, j in bad)


@pytest.mark.cuda
def test_saturation_nan_and_ties_are_the_references_cuda():
    """Out-of-range values (inf included), NaN and exact .5 ties through each quantizer, where
    the GPU path relies on the conversion instruction (satfinite FP8, cvt.rni.s32 INT8) rather
    than explicit clamps: bit for bit with the reference (quant-only ops)."""
    specials = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), float("nan"), 0.5, 1.5, 2.5,
                             -0.5, -2.5, 126.5, 127.5, -128.5, 447.0, 460.0, -470.0, 0.0, -0.0])
    x = torch.randn(64, 256, dtype=torch.float32)
    x[:, :specials.numel()] = specials
    x = x.cuda()
    one = torch.tensor(1.0, device="cuda")
    finite = torch.nan_to_num(x, nan=0.0, posinf=3e5, neginf=-3e5)  # per-row scales stay finite
    calls = [("quant_fp8_static", (x, one)), ("quant_int8_static", (x, one)),
             ("quant_int8_static", (x, one, torch.tensor(3, dtype=torch.int32, device="cuda"))),
             ("quant_int8_dynamic", (finite,)), ("quant_fp8_dynamic", (finite,)),
             ("quant_fp8_group", (finite, 64))]
    # non-finite rows / groups: NaN scales, and inf scales (a / inf = 0, inf / inf = NaN)
    with_inf = torch.nan_to_num(x, nan=1.0, posinf=float("inf"), neginf=float("-inf"))
    for xs in (x, with_inf):
        calls += [("quant_int8_dynamic", (xs,)), ("quant_fp8_dynamic", (xs,)),
                  ("quant_fp8_group", (xs, 64)), ("quant_int8_dynamic_asym", (xs,))]
    for op, args in calls:
        got = triton_ops.FUNCTIONS[op][0](*args)
        want = registry.ops()[op].reference(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            if g.dtype == torch.float8_e4m3fn:
                g, w = g.view(torch.uint8), w.view(torch.uint8)
            g, w = g.cpu(), w.cpu()
            same = (g == w) | (g.isnan() & w.isnan()) if g.is_floating_point() else g == w
            bad = (~same).nonzero()[:8].tolist()
            xs = args[0].cpu()
            assert not bad, f"{op}: " + ", ".join(
                f"x[{i},{j}]={xs[i, j].item()!r}: kernel {g[i, j].item()} reference {w[i, j].item()}"
                if g.shape == xs.shape else f"[{i},{j}]: kernel {g[i, j].item()} reference {w[i, j].item()}"
                for i, j in bad)
