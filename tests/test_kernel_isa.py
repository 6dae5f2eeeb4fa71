"""benchmarks/kernel_isa.py on the CPU: the row kernel compiled for sm_90 (Triton's bundled
ptxas), its SASS read back, instructions per element counted on the hot path.

Besides the tool itself, these pin what the kernel's instruction count rests on: no layout
conversion through shared memory (the weight of one row, the tiles of a split row), a split
row's statistics reduced across warps once, the static-scale quantizer's budget per element,
the paired / quad inline PTX only where every thread holds whole pairs / quads.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

triton = pytest.importorskip("triton")
if getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET is set", allow_module_level=True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_isa  # noqa: E402

from compile_norm.kernels import triton_ops  # noqa: E402


def _skip_without_tools(e: Exception) -> None:
    """Skip where ``e`` says an NVIDIA tool is missing: the environment, not the kernel."""
    text = str(e).lower()
    if ("ptxas" in text or "nvdisasm" in text or "cuobjdump" in text) and (
            "not found" in text or "cannot find" in text):
        pytest.skip(f"no NVIDIA tools: {e}")


def _analyse(*args, **kwargs) -> dict:
    try:
        return kernel_isa.analyse(*args, **kwargs)
    except Exception as e:
        _skip_without_tools(e)
        raise


def test_static_fp8_report(tmp_path):
    try:
        rc = kernel_isa.main(["--families", "rms_fp8_static", "--hidden", "4096",
                              "--out", str(tmp_path)])
    except RuntimeError as e:
        if "cannot find" in str(e).lower():
            pytest.skip(f"no NVIDIA tools: {e}")
        raise
    assert rc == 0
    (row,) = json.loads((tmp_path / "kernel_isa.json").read_text())
    md = (tmp_path / "kernel_isa.md").read_text()
    assert "| rms_fp8_static | 8192x4096 | m1 w8 [4096] |" in md
    cfg = triton_ops.launch_config(4096, 0)
    assert row["config"] == f"m{cfg.block_m} w{cfg.num_warps} [4096]"
    assert 0 < row["registers"] <= 255
    # the exact division of a scale outside the normal range and the IEEE division's slow
    # path are in the body, not on the hot path
    assert row["hot"] < row["body"] and not row["loop"]
    assert not any(op.startswith(("CALL", "RET")) for op in row["opcodes"])
    assert sum(row["opcodes"].values()) == row["hot"]
    per_elem = row["hot"] * cfg.num_warps * 32 / (cfg.block_m * 4096)
    assert row["per_element"] == pytest.approx(per_elem)
    assert sum(row["classes"].values()) == pytest.approx(per_elem)
    # the weight takes x's layout: no 128-bit shared-memory round trip (the row sum's
    # cross-warp step moves 32-bit values)
    assert not any(op.startswith(("STS.128", "LDS.128")) for op in row["opcodes"]), row["opcodes"]
    # one FMUL and two FFMA per element for the quotient, a NaN guard, no copysign: 20.0
    # per element before these were cut, 16.9 after
    assert row["per_element"] <= 17.5, row["per_element"]


def test_split_row_statistics_are_reduced_once():
    """5376 = 4096 + 1024 + 256: each row statistic (sum of squares, amax) folds its three
    tiles into one partial inside each thread and is reduced across warps once, and no tile
    is moved to another's layout through shared memory."""
    row = _analyse("rms_fp8_dynamic", 8192, 5376)
    assert "[4096+1024+256]" in row["config"]
    ops = row["opcodes"]
    assert not any(op.startswith(("STS.128", "LDS.128", "STS.64", "LDS.64")) for op in ops)
    # two statistics, one butterfly (5 shuffles) and one cross-warp step (2 at 4 warps) each;
    # per tile they were 42
    assert ops.get("SHFL.BFLY", 0) <= 2 * 7, ops.get("SHFL.BFLY")
    assert row["per_element"] <= 14.5, row["per_element"]  # 20.1 before


def test_paired_and_quad_ptx_only_on_tiles_that_hold_them():
    """16 warps on 4096 + 1024 + 256: the 256 tile has one element per thread. Its bf16
    widening and INT8 packing must take the plain casts (an odd element count per thread
    cannot be paired: Triton aborts), the 4096 tile the inline PTX."""
    cfg = triton_ops.LaunchConfig(1, ((1, 4096), (1, 1024), (1, 256)), 16)
    row = _analyse("rms_int8_dynamic", 8192, 5376, cfg)
    ops = row["opcodes"]
    assert ops.get("F2I.S8.NTZ", 0) > 0  # cvt.rni.s8.f32: the quads
    assert ops.get("F2I.FTZ.NTZ", 0) > 0  # float2int_rn + clamps: the small tiles


def test_inductors_copy_of_the_kernel_compiles_to_the_same_code(tmp_path):
    """Under compile the kernel is a user-defined Triton kernel: Inductor copies its source
    and what it uses (helpers, the inline PTX, num_threads' import) into generated code. That
    copy must compile to the same instructions as the eager kernel."""
    import importlib.util

    from torch._inductor.codegen import wrapper

    closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if closure is None:
        pytest.skip("this torch copies user-defined kernels another way")
    kernel = triton_ops.kernel_module().norm_quant_kernel
    path = tmp_path / "inductor_copy.py"
    unspecialized = [p.name for p in kernel.params if p.do_not_specialize]
    path.write_text("import triton\nimport triton.language as tl\n"
                    "from triton.language.extra import libdevice\n"
                    f"@triton.jit(do_not_specialize={unspecialized!r})\n" + closure(kernel))
    spec = importlib.util.spec_from_file_location("inductor_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    eager = _analyse("rms_int8_dynamic", 8192, 5376)
    copied = _analyse("rms_int8_dynamic", 8192, 5376, fn=module.norm_quant_kernel)
    assert copied["opcodes"] == eager["opcodes"] and copied["registers"] == eager["registers"]


SASS = """
norm_quant_kernel:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/               @P0 EXIT ;
        /*0030*/                   FSETP.GT.AND P1, PT, R1, 1, PT ;
        /*0040*/               @P1 BRA `(.L_x_0) ;
        /*0050*/                   FCHK P0, R1, R2 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   MOV R14, 0x90 ;
        /*0080*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
.L_x_1:
        /*0090*/                   FMUL R2, R1, R1 ;
        /*00a0*/                   BRA `(.L_x_2) ;
.L_x_0:
        /*00b0*/                   FADD R2, R1, R1 ;
.L_x_2:
        /*00c0*/                   STG.E desc[UR4][R4.64], R2 ;
        /*00d0*/                   EXIT ;
.L_x_3:
        /*00e0*/                   BRA `(.L_x_3) ;
        /*00f0*/                   NOP ;
        .weak           $__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath
        .type           $__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath,@function
$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
        /*0100*/                   RET.REL.NODEC R14 `(norm_quant_kernel) ;
"""


def test_hot_path_falls_through_except_around_slow_paths():
    body = kernel_isa.kernel_body(SASS)
    insns = [x for x in body if isinstance(x, kernel_isa.Insn)]
    assert len(insns) == 14  # neither the padding (self-branch, NOP) nor the subroutine
    path, loop = kernel_isa.hot_path(kernel_isa.blocks(body))
    # @P0 EXIT and @P1 BRA (the exact branch: FADD) fall through; the branch over the
    # slow path's CALL is taken
    assert [x.opcode for x in path] == [
        "S2R", "ISETP.GE.AND", "EXIT", "FSETP.GT.AND", "BRA", "FCHK", "BRA", "FMUL", "BRA",
        "STG.E", "EXIT"] and not loop


CLASSES = [  # (opcode, operands, class): the idioms the table's classes rest on
    ("SHF.L.U32", "R1, R2, 0x10, RZ", "convert"),  # bf16 in the low half: its fp32
    ("IMAD.U32", "R1, R2.reuse, 0x10000, RZ", "convert"),
    ("LOP3.LUT", "R1, R2, 0xffff0000, RZ, 0xc0, !PT", "convert"),  # the high half
    ("SHF.L.U32", "R1, R2, 0x4, RZ", "int/addr"),
    ("LOP3.LUT", "P0, RZ, R2, 0x1f, RZ, 0xc0, !PT", "pred/sel"),
    ("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", "R1, R2, R3, RZ", "convert"),
    ("FFMA", "R1, R2, R3, -R4", "fp32"),
    ("HMUL2.BF16_V2", "R1, R2, R3", "fp32"),
    ("SHFL.BFLY", "PT, R1, R2, 0x10, 0x1f", "reduce/shfl"),
    ("LDG.E.EF.128", "R4, desc[UR8][R6.64]", "memory"),
    ("FSEL", "R1, R2, R3, !P0", "pred/sel"),
    ("UIMAD.WIDE.U32", "UR4, UR10, UR4, URZ", "int/addr"),
    ("S2R", "R0, SR_TID.X", "other"),
]


@pytest.mark.parametrize("opcode,operands,cls", CLASSES)
def test_instruction_classes(opcode, operands, cls):
    assert kernel_isa.insn_class(kernel_isa.Insn(opcode, operands, False)) == cls


def test_gated_fp8_counts_the_exact_silu():
    """The Qwen3-Next gated norm + FP8 family: the op is the fused one, the gate is a second
    [T, H] input, and its SiLU is eager's exact one (libdevice expf and an IEEE division,
    whose fast path FCHK guards): one MUFU.EX2 and one MUFU.RCP per element per thread
    (benchmarks/RESULTS.md: what sets this family's instruction count)."""
    op, args = kernel_isa.family_call("gated_qwen3_next_fp8", 8192, 4096)
    assert op == "rms_norm_gated_fp8_dynamic" and tuple(args[1].shape) == (8192, 4096)
    row = _analyse("gated_qwen3_next_fp8", 8192, 4096)
    cfg = triton_ops.launch_config(4096, 0, True)
    per_thread = cfg.block_m * 4096 // (cfg.num_warps * 32)  # elements a thread holds
    ops = row["opcodes"]
    assert ops.get("MUFU.EX2", 0) == per_thread and ops.get("MUFU.RCP", 0) >= per_thread
    assert ops.get("FCHK", 0) >= per_thread
    assert row["per_element"] > kernel_isa.analyse("rms_fp8_dynamic", 8192, 4096)["per_element"]


def test_mxfp8_counts_one_scale_per_block_and_no_division():
    """Norm + MXFP8 (blocks of 32, floor scales): the op is the fused one; its E8M0 scale is a
    power of two, so the quotient is a multiply (no MUFU.RCP, no FCHK per element), and the
    family stays below per-group FP8's instruction count at 4096 and 5376."""
    op, _ = kernel_isa.family_call("rms_mxfp8", 8192, 4096)
    assert op == "rms_norm_mxfp8"
    for hidden in (4096, 5376):
        row = _analyse("rms_mxfp8", 8192, hidden)
        cfg = triton_ops.launch_config(hidden, 32, True)
        per_thread = cfg.block_m * sum(n * g for n, g in cfg.tiles) // (cfg.num_warps * 32)
        ops = row["opcodes"]  # (a few per row: rstd's and the tiles' reciprocal checks)
        assert ops.get("FCHK", 0) < per_thread // 4 and ops.get("MUFU.RCP", 0) < per_thread // 4, ops
        assert ops.get("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", 0) * 2 >= per_thread  # packed codes
        assert row["per_element"] < _analyse("rms_fp8_group128", 8192, hidden)["per_element"]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("hidden", [128, 3840, 5376])
def test_sandwich_rounds_its_first_norm_before_the_add(dtype_name, hidden):
    """rms_norm_add_rms_norm: x's norm ends in a multiply by the weight, then the residual
    add. Fused into one fma they round once where torch and the two kernels round twice:
    LLVM did it for 16-bit x (a packed ``fma.rn.bf16x2``), ptxas for fp32 x (an FFMA; the CUDA
    composition tests failed on both). The add is PTX ``add.rn.f32``, which neither fuses,
    and the SASS has the fp32 fmas and 16-bit multiplies of the two kernels together."""
    import re
    from collections import Counter

    import torch

    from compile_norm.ops import registry

    dt = getattr(torch, dtype_name)

    def compiled(name, args):
        launch = triton_ops.prepare(registry.spec(name), args)
        k = kernel_isa.compile_sm90(launch)
        try:
            sass = kernel_isa.disassemble(k.asm["cubin"])
        except Exception as e:  # noqa: BLE001  (no nvdisasm: the environment)
            pytest.skip(f"no NVIDIA tools: {e}")
        ops = Counter(re.findall(r"\b(FFMA|HMUL2|HFMA2)\b", sass))
        return k.asm["ptx"], ops

    def m(*shape):
        return torch.empty(*shape, device="meta", dtype=dt)

    ptx, sandwich = compiled("rms_norm_add_rms_norm", (m(5, hidden), m(5, hidden), m(hidden),
                                                       1e-6, m(hidden), 1e-5, 0.0, 0.0))
    _, norm = compiled("rms_norm", (m(5, hidden), m(hidden), 1e-6, 0.0, None))
    _, add = compiled("fused_add_rms_norm", (m(5, hidden), m(5, hidden), m(hidden), 1e-5, 0.0,
                                             None))
    assert "fma.rn.bf16" not in ptx and "fma.rn.f16" not in ptx
    assert ptx.count("add.rn.f32") >= 1
    assert sandwich["FFMA"] == norm["FFMA"] + add["FFMA"], (sandwich, norm, add)
    assert sandwich["HMUL2"] == norm["HMUL2"] + add["HMUL2"], (sandwich, norm, add)


def _first(body: list, pred) -> int:
    return next((i for i, x in enumerate(body) if pred(x)), len(body))


@pytest.mark.parametrize("family,hidden", [("rms_norm", 4096), ("gemma_rms_norm", 4096),
                                           ("add_rms_norm", 5376), ("add_rms_fp8_dynamic", 4096),
                                           ("rms_fp8_static", 4096)])
def test_weight_is_read_with_x(family, hidden):
    """EARLY_LOADS (the default): every weight load (the evict_last ``LDG``s) is issued before
    x's first math (the sum of squares' first FMUL / FFMA), so a decode-sized grid waits for
    one memory round trip; ptxas alone sinks them below it."""
    row = _analyse(family, 1, hidden)
    body = [x for x in kernel_isa.kernel_body(row["sass"]) if isinstance(x, kernel_isa.Insn)]
    weight = [i for i, x in enumerate(body) if x.opcode.startswith("LDG") and ".EL" in x.opcode]
    math = _first(body, lambda x: x.base in ("FMUL", "FFMA"))
    assert weight and math < len(body), (weight, math)
    assert max(weight) < math, (weight, math)


@pytest.mark.parametrize("family", ["gated_qwen3_next", "gated_qwen3_next_fp8"])
@pytest.mark.parametrize("hidden", [3584, 5376])
def test_gate_is_read_with_x_on_a_split_row(family, hidden):
    """The gate applied after the norm (Qwen3-Next) is read with x under EARLY_LOADS: every
    load of a split row (three column tiles) comes before the first math. ptxas alone sinks
    2-4 of the gate's loads below the reduction there, a second round trip per program."""
    row = _analyse(family, 8192, hidden)
    body = [x for x in kernel_isa.kernel_body(row["sass"]) if isinstance(x, kernel_isa.Insn)]
    loads = [i for i, x in enumerate(body) if x.opcode.startswith("LDG")]
    math = _first(body, lambda x: x.base in ("FMUL", "FFMA"))
    assert "+" in row["config"] and len(loads) >= 9, row["config"]  # x, gate, weight per tile
    assert max(loads) < math, (loads, math)


@pytest.mark.parametrize("hidden", [4096, 5376])
def test_static_scale_is_read_with_x_under_the_early_schedule(hidden):
    """A static-scale launch measured faster with the early schedule (a config's
    ``early_loads``) reads the scale, not only the weight, before x's first math: ptxas
    otherwise sinks the scale's load below the reduction, a round trip of its own."""
    default = triton_ops.launch_config(hidden, 0)
    for early in (True, False):
        row = _analyse("rms_fp8_static", 1, hidden, default._replace(early_loads=early))
        body = [x for x in kernel_isa.kernel_body(row["sass"]) if isinstance(x, kernel_isa.Insn)]
        loads = [i for i, x in enumerate(body) if x.opcode.startswith("LDG")]
        scale = [i for i in loads if ".EL" not in body[i].opcode and ".EF" not in body[i].opcode]
        math = _first(body, lambda x: x.base in ("FMUL", "FFMA"))
        assert len(scale) == 1, [body[i].opcode for i in loads]
        assert (max(loads) < math) == early, (loads, scale, math)


def test_dweight_column_sums_keep_several_steps_of_loads_in_flight():
    """The backward's column sums over the fp32 dweight partials, at ``REDUCE_CONFIG``: the
    loop over the partial rows is software-pipelined, its loads asynchronous copies to shared
    memory (LDGSTS) issued for the next steps while one is added; with one stage there are
    none (H200 run 57: unpipelined, the same blocks ran 0-6% slower, 32x4096 9.1 against
    8.6 us)."""
    import types

    import torch

    from compile_norm.kernels import triton_backward, triton_backward_kernel

    rc = triton_backward.REDUCE_CONFIG
    partials, hidden = 264, 2048  # two programs per SM of the backward at 2048 columns

    def sass(num_stages):
        launch = types.SimpleNamespace(
            args=(torch.empty(partials, hidden, device="meta"),
                  torch.empty(hidden, dtype=torch.bfloat16, device="meta"), partials, hidden),
            const_kwargs=lambda: dict(BLOCK_P=rc.block_p, BLOCK_C=rc.block_c, PRECISE=True,
                                      NUM_STAGES=num_stages),
            num_warps=rc.num_warps)
        try:
            k = kernel_isa.compile_sm90(launch, fn=triton_backward_kernel.dweight_reduce_kernel)
            return kernel_isa.disassemble(k.asm["cubin"])
        except Exception as e:
            _skip_without_tools(e)
            raise

    assert rc.num_stages > 1
    assert "LDGSTS" in sass(rc.num_stages)
    assert "LDGSTS" not in sass(1)
