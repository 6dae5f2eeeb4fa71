"""The persistent, prefetching kernel variant (``LaunchConfig.programs_per_sm > 0``).

Each case runs the op with the one-shot launch and with the persistent one (the same
block_m and tiles; ``triton_ops.launch_config`` patched) on the same fresh inputs: every
output must be bit-identical (NaN patterns included), and the persistent outputs must
agree with the reference within compile_norm.kernels.checking's tolerances. The child
process (this file run as a script, TRITON_INTERPRET=1) also records every launch's grid
and PERSISTENT flag, so the tests see that the loop really ran with fewer programs than
row blocks. Under the interpreter the "SM count" is ``triton_ops._INTERPRET_SMS`` (4).
The sm_90 code-generation tests (CPU, ptxas only) check the loop itself: it carries only
the raw tiles that exist, and the next block's loads precede the current block's stores.
"""

from __future__ import annotations

import json

import pytest

from helpers import interpreter_report

def _bits(t):
    """A tensor's bit pattern (NaN == NaN), as an integer tensor."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t


def run_pair(case, device, programs_per_sm, block_m=None, tiles=None, seed=0):
    """Run ``case`` one-shot and persistent; returns (problems, number of outputs)."""
    import torch

    from compile_norm.kernels import checking, triton_ops
    from compile_norm.ops import registry

    args, kwargs = checking.build_call(case, device, seed)
    pos = checking.positional(case.op, args, kwargs)
    fn = triton_ops.FUNCTIONS[case.op][0]
    real = triton_ops.launch_config

    def call(pps):
        def patched(hidden, *key):
            cfg = real(hidden, *key)
            return cfg._replace(block_m=block_m or cfg.block_m, tiles=tiles or cfg.tiles,
                                programs_per_sm=pps)

        triton_ops.launch_config = patched
        try:
            out = fn(*pos)
        finally:
            triton_ops.launch_config = real
        return out if isinstance(out, tuple) else (out,)

    one_shot, persistent = call(0), call(programs_per_sm)
    problems = []
    names = checking.output_names(case.op)
    for name, a, b in zip(names, one_shot, persistent):
        if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
            problems.append(f"{name}: layout {a.shape}/{a.stride()} vs {b.shape}/{b.stride()}")
        elif not torch.equal(_bits(a), _bits(b)):
            n = int((_bits(a) != _bits(b)).sum())
            problems.append(f"{name}: {n} elements differ from the one-shot kernel")
    w_dtype = checking.weight_dtype(case)
    ref = registry.ops()[case.op].reference(*pos)
    res = checking.compare(case.op, persistent, ref, case.dtype,
                           checking.fake_outputs(case.op, pos), w_dtype, case.offset)
    if not res.ok:
        problems.append(f"vs reference: {res.problems}")
    return problems, len(persistent)


def _cases():
    """(case, programs_per_sm, block_m, tiles): small shapes (the interpreter is slow)."""
    import torch

    from compile_norm.kernels.checking import Case

    bf16 = torch.bfloat16
    three = ((1, 256), (1, 128), (1, 128))  # 448 = 256 + 128 + 64 (last tile masked)
    group3 = ((4, 64), (2, 64), (2, 64))  # the same split in groups of 64
    return [
        # 37 rows, 4 programs: 10 / 9 / 9 / 9 blocks (37 is not a multiple of 4)
        (Case("rms_norm", (37, 128), bf16), 1, 1, None),
        (Case("rms_norm", (37, 128), bf16), 1, 2, None),  # 19 blocks, last one half
        (Case("rms_norm", (37, 448), torch.float16, offset=1.0), 1, 1, three),
        (Case("fused_add_rms_norm", (37, 300), bf16), 1, 2, None),
        (Case("fused_add_rms_norm", (5, 7, 448), bf16, layout="strided"), 2, 1, three),
        (Case("rms_norm_fp8_static", (37, 256), bf16), 1, 1, None),
        (Case("fused_add_rms_norm_fp8_dynamic", (37, 300), bf16), 1, 2, None),
        (Case("fused_add_rms_norm_fp8_dynamic", (37, 448), bf16, scale_ub=True), 1, 1, three),
        (Case("rms_norm_fp8_dynamic", (11, 256), torch.float32, nan=True), 1, 1, None),
        (Case("rms_norm_fp8_group", (37, 256), bf16, group_size=64), 1, 1, None),
        (Case("fused_add_rms_norm_fp8_group", (37, 448), bf16, group_size=64,
              column_major=True), 1, 2, group3),
        (Case("rms_norm_fp8_group", (13, 2304), bf16), 1, 1, None),  # 2048 + 256, groups 128
        (Case("rms_norm_int8_dynamic", (37, 200), bf16), 1, 1, None),
        (Case("fused_add_rms_norm_int8_dynamic_asym", (37, 320), bf16), 1, 1, None),
        (Case("fused_add_rms_norm_int8_dynamic_asym", (37, 448), bf16), 1, 2, three),
        (Case("rms_norm_int8_static", (37, 256), bf16, azp=True), 1, 2, None),
        (Case("quant_fp8_group", (37, 256), bf16, group_size=64), 1, 1, None),
        (Case("rms_norm", (3, 128), bf16), 2, 1, None),  # fewer blocks than programs
        (Case("rms_norm_fp8_dynamic", (0, 256), bf16), 1, 1, None),  # zero tokens
        (Case("fused_add_rms_norm_int8_dynamic_asym", (0, 320), bf16), 1, 1, None),
    ]


def _child() -> None:
    import torch  # noqa: F401

    import compile_norm  # noqa: F401
    from compile_norm.kernels import triton_ops

    assert triton_ops.INTERPRET and triton_ops.SUPPORTED, triton_ops.REASON
    launches = []
    real = triton_ops.K.norm_quant_kernel

    class Recording:  # records (grid, PERSISTENT) of every launch
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((grid[0], bool(kwargs.get("PERSISTENT"))))
                return real[grid](*args, **kwargs)

            return run

    triton_ops.K = type("K", (), {"norm_quant_kernel": Recording()})
    results = []
    for case, pps, block_m, tiles in _cases():
        del launches[:]
        try:
            problems, n_out = run_pair(case, "cpu", pps, block_m, tiles)
        except Exception as e:  # report, don't stop the run
            problems, n_out = [f"{type(e).__name__}: {e}"], 0
        results.append({"name": case.name(), "pps": pps, "block_m": block_m,
                        "tokens": case.shape[0] * (case.shape[1] if len(case.shape) == 3 else 1),
                        "launches": list(launches), "problems": problems, "outputs": n_out})
    print("REPORT" + json.dumps({"results": results, "sms": triton_ops._INTERPRET_SMS}))


@pytest.fixture(scope="module")
def report():
    return interpreter_report(__file__, timeout=900)


@pytest.mark.parametrize("index", range(len(_cases())))
def test_persistent_matches_one_shot_interpreter(report, index):
    r = report["results"][index]
    assert not r["problems"], f"{r['name']} m{r['block_m']} pps{r['pps']}: {r['problems']}"
    assert r["outputs"] >= 1
    blocks = -(-r["tokens"] // r["block_m"])
    if blocks == 0:  # zero tokens: no launch at all
        assert r["launches"] == []
    else:  # one-shot: one program per block; persistent: at most SMs * programs_per_sm
        assert r["launches"] == [[blocks, False], [min(blocks, report["sms"] * r["pps"]), True]]


def test_cases_cover_the_loop(report):
    # most cases have more row blocks than programs, so programs loop (and prefetch)
    looping = [r for r in report["results"]
               if r["launches"] and r["launches"][1][0] < r["launches"][0][0]]
    assert len(report["results"]) == len(_cases()) and len(looping) >= 15


def test_default_launch_config_is_one_shot():
    triton = pytest.importorskip("triton")  # noqa: F841
    from compile_norm.kernels import triton_ops

    for h, g in ((128, 0), (4096, 0), (5376, 0), (2304, 128)):
        assert triton_ops.launch_config(h, g).programs_per_sm == 0


# --- CUDA --------------------------------------------------------------------------------------

_CUDA_OPS = ["rms_norm", "fused_add_rms_norm", "rms_norm_fp8_static", "fused_add_rms_norm_fp8_dynamic",
             "rms_norm_fp8_group", "rms_norm_int8_dynamic", "fused_add_rms_norm_int8_dynamic_asym"]


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [4096, 5376])
@pytest.mark.parametrize("op", _CUDA_OPS)
@pytest.mark.parametrize("programs_per_sm", [2, 8])
def test_persistent_matches_one_shot_cuda(op, hidden, programs_per_sm):
    import torch

    from compile_norm.kernels.checking import Case

    case = Case(op, (8192, hidden), torch.bfloat16)
    problems, _ = run_pair(case, "cuda", programs_per_sm, block_m=1)
    assert not problems, problems


# --- sm_90 code generation (CPU, no GPU: like tests/test_kernels_compile.py) -----------------

_SM90 = {  # (QUANT, hidden, group, HAS_RES)
    "rms_norm_4096": (0, 4096, 0, False),
    "add_fp8_dynamic_4096": (2, 4096, 0, True),
    "fp8_static_5376": (1, 5376, 0, False),  # three tiles
    "add_int8_asym_2304": (6, 2304, 0, True),  # two tiles
    "fp8_group_2304": (3, 2304, 128, False),
}


def _compile_sm90(mode, hidden, group, res, persistent):
    triton = pytest.importorskip("triton")
    if getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is set")
    from compile_norm.kernels import triton_ops as O
    from compile_norm.kernels.quant_modes import AMAX_MODES
    from sm90 import compile_row_kernel

    cfg = O.launch_config(hidden, group, mode in AMAX_MODES)
    (ng0, g0), (ng1, g1), (ng2, g2) = cfg.tiles
    dtypes = {"q_ptr": "fp8e4nv" if mode in (1, 2, 3) else "i8", "s_ptr": "fp32",
              "azp_ptr": "i32", "scale_in_ptr": "fp32", "aux_in_ptr": "fp32"}
    const = dict(stride_w=1,  # a contiguous weight (Triton specializes ints == 1)
                 xw_ptr=None, stride_xw=1,  # no norm of x before the add (rms_norm_add_rms_norm's)
                 BLOCK_M=1, NG0=ng0, G0=g0, NG1=ng1, G1=g1, NG2=ng2, G2=g2, HAS_RES=res,
                 DO_NORM=True, HAS_WEIGHT=True, W_OFFSET=False, HAS_VSIZE=False,
                 STORE_OUT=mode == 0, QUANT=mode, HAS_AUX=False, UE8M0=False, PRECISE=True,
                 SCALAR_RECIP=True, FP8_RECIP=O._FP8_RECIP, INT8_RECIP=O._INT8_RECIP,
                 U8_RECIP=O._U8_RECIP, PERSISTENT=persistent)
    return compile_row_kernel(const, cfg.num_warps, dtypes), cfg


@pytest.mark.parametrize("name", list(_SM90))
def test_persistent_code_for_sm90(name):
    import re

    mode, hidden, group, res = _SM90[name]
    one, cfg = _compile_sm90(mode, hidden, group, res, False)
    pers, _ = _compile_sm90(mode, hidden, group, res, True)
    tiles = sum(1 for ng, _ in cfg.tiles if ng)
    ttgir = pers.asm["ttgir"]
    # the loop carries the block index and the raw tiles that exist, nothing else (the
    # placeholders of absent tiles / residual are dropped)
    loops = re.findall(r"scf\.while \((.*?)\) :", ttgir)
    assert len(loops) == 1 and len(loops[0].split(", ")) == 1 + tiles * (2 if res else 1), loops
    assert "scf.while" not in one.asm["ttgir"]
    # in the loop body, the next block's loads (x / residual: evict_first; the weight is
    # evict_last) come before this block's first store
    body = ttgir[ttgir.index("scf.while"):]
    assert body.index("evictionPolicy = evict_first") < body.index("tt.store")
    # the same 16-byte vector loads as the one-shot kernel, twice (prologue + prefetch)
    vec = r"ld\.global\.L1::evict_first[^ ]*\.v4"
    n_one = len(re.findall(vec, one.asm["ptx"]))
    assert n_one > 0 and len(re.findall(vec, pers.asm["ptx"])) == 2 * n_one


if __name__ == "__main__":
    _child()
