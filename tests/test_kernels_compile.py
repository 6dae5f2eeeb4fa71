"""Compile the Triton kernel for an H100 (sm_90a) on the CPU, without a GPU.

Catches code-generation errors in the GPU path (libdevice, NaN-propagating reductions, fp8
casts), which the interpreter tests never compile, and checks the properties the
performance design relies on: 16-byte vector loads with evict-first hints, and no
per-element IEEE division (div.rn is a subroutine call with a slow path). (ptxas -v on
these showed 32-64 registers, no spills, per-group FP8 split in three tiles included
since the tiles keep their own layouts; only hidden 65536 in fp32 spills.)
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
if getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET is set", allow_module_level=True)

from compile_norm.kernels import triton_kernel as K  # noqa: E402
from compile_norm.kernels import triton_ops as O  # noqa: E402
from compile_norm.kernels.quant_modes import AMAX_MODES  # noqa: E402
from sm90 import compile_row_kernel  # noqa: E402


def _compile(mode, hidden, *, group=0, xdt="bf16", wdt="bf16", res=True, norm=True, store=False,
             aux=False, ue=False, woff=False, scale=None, gate=0, grouped=False, promote=False,
             scales_only=False, x_norm=False, x_woff=False):
    cfg = O.launch_config(hidden, group if mode == 3 or grouped else 0, mode in AMAX_MODES)
    (ng0, g0), (ng1, g1), (ng2, g2) = cfg.tiles
    qdt = "fp8e4nv" if mode in (1, 2, 3) else "i8"
    dtypes = {"x_ptr": xdt, "r_ptr": xdt, "w_ptr": wdt, "out_ptr": xdt, "res_out_ptr": xdt,
              "q_ptr": qdt, "s_ptr": "fp32", "azp_ptr": "i32", "scale_in_ptr": "fp32",
              "aux_in_ptr": "i32" if mode == 4 else "fp32", "xw_ptr": wdt}
    const = dict(BLOCK_M=cfg.block_m, NG0=ng0, G0=g0, NG1=ng1, G1=g1, NG2=ng2, G2=g2, HAS_RES=res, DO_NORM=norm, HAS_WEIGHT=norm,
                 W_OFFSET=woff, HAS_VSIZE=False, STORE_OUT=store, QUANT=mode, HAS_AUX=aux,
                 UE8M0=ue, PRECISE=True, SCALAR_RECIP=True, FP8_RECIP=O._FP8_RECIP,
                 INT8_RECIP=O._INT8_RECIP, U8_RECIP=O._U8_RECIP, GATE=gate,
                 NORM_GROUPED=grouped, PROMOTE=promote, X_NORM=x_norm, X_W_OFFSET=x_woff)
    # dynamic FP8 scale arithmetic (quant.fp8_kernel_scale's fields), else the defaults
    names = ("SCALE_FORM", "MIN_AT", "MIN_VALUE", "INV_MIN", "SCALE_X_DT")
    const.update(zip(names, scale or ()))
    if scales_only:  # no q pointer: per-tensor FP8's first pass (triton_ops.prepare store_q=False)
        const["q_ptr"] = None
    return compile_row_kernel(const, cfg.num_warps, dtypes)


VARIANTS = {
    "rms_norm": dict(mode=0, hidden=4096, res=False, store=True),
    "fused_add_gemma": dict(mode=0, hidden=5376, store=True, woff=True),
    "fp8_static_2304": dict(mode=1, hidden=2304, res=False),
    "int8_dynamic_5376": dict(mode=5, hidden=5376, res=False),
    "add_fp8_dynamic_ub": dict(mode=2, hidden=4096, aux=True),
    "fp8_static_quant_only": dict(mode=1, hidden=4096, res=False, norm=False),
    "fp8_group_ue8m0": dict(mode=3, hidden=7168, group=128, ue=True),
    "int8_static_azp": dict(mode=4, hidden=4096, aux=True),
    "int8_dynamic_qk": dict(mode=5, hidden=128),
    "int8_asym_fp16": dict(mode=6, hidden=4096, xdt="fp16", wdt="fp16"),
    # torchao's rowwise training form: float64 inverse clamped at 1e-12, power of two
    "add_fp8_inverse_pow2": dict(mode=2, hidden=4096, scale=(3, 2, 1e-12, 4.48e14, False)),
    # vLLM's native form (multiply by reciprocal(scale)); torchao inference (bf16 scale)
    "fp8_dynamic_multiply": dict(mode=2, hidden=5376, res=False, scale=(1, 1, 2.2e-6, 0.0, False)),
    "add_fp8_dynamic_scales_only": dict(mode=2, hidden=5376, scales_only=True),
    "fp8_group_x_dtype_scale": dict(mode=3, hidden=7168, group=128, scale=(0, 0, 0.0, 0.0, True)),
    # the gated norm: Qwen3-Next (gate after) + per-token FP8; Mamba-2 (gate before, groups
    # of 1024) alone and with a float32 weight (float32 output) + per-token INT8
    "gated_after_fp8_dynamic": dict(mode=2, hidden=4096, res=False, gate=1),
    "gated_before_groups": dict(mode=0, hidden=8192, res=False, store=True, gate=2, group=1024,
                                grouped=True),
    # Gemma's sandwich (rms_norm_add_rms_norm): x's norm, the add, the sum's norm
    "sandwich_gemma_3840": dict(mode=0, hidden=3840, store=True, woff=True, x_norm=True,
                                x_woff=True, wdt="fp32"),
    "sandwich_5376": dict(mode=0, hidden=5376, store=True, x_norm=True),
    "gated_before_promote_int8": dict(mode=5, hidden=5376, res=False, wdt="fp32", gate=2,
                                      group=256, grouped=True, promote=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90(name):
    kw = VARIANTS[name]
    try:
        ck = _compile(**kw)
    except Exception as e:  # a missing ptxas etc. is an environment problem, not a bug
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    ptx = ck.asm["ptx"]
    assert re.search(r"ld\.global\.L1::evict_first[^ ]*\.v[24]", ptx), "x is not loaded as vectors"
    if kw["mode"] in (2, 5, 6) and not (kw.get("scale") or kw.get("gate") or kw.get("scales_only")):
        # one correctly rounded reciprocal per row, then a * (1/b) plus an fma correction
        # per element instead of a division each (static scales keep a div.rn branch for
        # scales outside the normal range; per-group FP8 divides once per group)
        assert 0 < ptx.count("div.rn.f32") <= 4, ptx.count("div.rn.f32")
    if kw["mode"] in (1, 2, 3):  # FP8 codes are converted and stored, unless scales only
        assert ("e4m3" in ptx) != bool(kw.get("scales_only")), kw
    if kw.get("gate"):
        # silu as ATen computes it: libdevice's accurate expf (its fma.rm range reduction;
        # tl.exp is a bare ex2.approx) and an IEEE division per element
        assert "fma.rm.ftz.f32" in ptx and "div.rn.f32" in ptx
    assert ck.asm.get("cubin"), "ptxas produced no binary"


def _lowered_kernels():
    """Every ``*_kernel`` JIT function of the kernel modules: what the lower pass hands
    Inductor as a user-defined Triton kernel."""
    from compile_norm.kernels import triton_backward_kernel, two_pass

    return [(f"{m.__name__}.{n}", f) for m in (K, triton_backward_kernel, two_pass)
            for n, f in vars(m).items() if isinstance(f, triton.runtime.jit.JITFunction) and n.endswith("kernel")]


LOWERED = _lowered_kernels()


@pytest.mark.parametrize("name, kernel", LOWERED, ids=[n for n, _ in LOWERED])
def test_inductor_can_embed_the_kernel_source(name, kernel):
    """Inductor writes a user-defined kernel's source (with every JIT function it calls) into
    its output code inside a ''' string; torch 2.11 does not escape backslashes there, so an
    escape such as \\n in an inline-PTX string becomes a raw newline and the generated file
    does not parse (run 26). The source must survive that embedding."""
    import ast

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure

    src = closure(kernel, None) if closure.__code__.co_argcount > 1 else closure(kernel)
    embedded = ast.literal_eval("'''" + src.replace("'''", "\\'\\'\\'") + "'''")  # as torch 2.11 does
    compile(embedded, name, "exec")
