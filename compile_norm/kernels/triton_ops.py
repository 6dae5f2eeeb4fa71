"""Triton providers ("triton") for every compile_norm op: thin wrappers over one kernel.

Every eager call is one launch of ``triton_kernel.norm_quant_kernel`` (none for zero tokens);
outputs have exactly the layout and dtype of the op's fake.

Tolerances against the reference (what tests/test_kernels*.py assert; derivation in
compile_norm/kernels/checking.py): ``residual_out`` is exact; ``out`` within 1 ulp of x.dtype,
or 2 ulps when a 16-bit weight is applied Llama-style (``round(round(y) * w)``: the fp32 sum
of squares is reduced in another order, so ``rstd`` may differ in its last bits and flip
the first rounding), at most 1% of elements differing; fp32 x: rtol 1e-5. Scales follow
``out``'s relative bound; FP8 codes within one step; INT8 within
``1 + ceil(2 * eps_out * |q|)``. Quant-only ops match bit for bit.

Where the reference is device dependent the kernel follows the device it runs on: on CUDA
``tensor / python_number`` is ATen's multiply by the fp32 reciprocal, on CPU (interpreter)
a true division.

supports rules (every op): x on CUDA (on CPU only under TRITON_INTERPRET=1), x float16,
bfloat16 or float32 (float64 goes to native), 1 <= hidden <= 65536, weight (if any)
float16/bfloat16/float32 on the device (any mix with x.dtype is reproduced exactly, as is
``variance_size``); fp8_group: group_size a power of two. Inputs whose last dim is not
contiguous are copied first (an extra copy, still correct); so are inputs whose leading
dims cannot be flattened into one row stride (e.g. transposed leading dims).
Large hidden sizes keep the whole row in registers: up to 16K elements per program without
spills; 65536 in fp32 spills (correct, slower). Non-power-of-two rows are split into up to
three power-of-two tiles (``column_tiles``) rather than padded.

Launch: one program per block of ``block_m`` rows, or, with ``LaunchConfig.programs_per_sm
> 0``, a persistent grid of at most SM count * programs_per_sm programs that loop over row
blocks and prefetch the next one (same numerics, bit for bit). It is off
(``launch_config`` returns 0): on the H100 it lost everywhere (run 7 in
benchmarks/RESULTS.md: two row blocks in registers cost more occupancy than the prefetch
hides); ``benchmarks/launch_sweep.py`` keeps trying it. The compiled kernel is cached per
(constexprs, num_warps, dtypes, Triton's specializations) and launched through its ``run``
directly (``_kernel_launch``); misaligned pointers always take ``JITFunction.run``.
Measured on H100 (torch 2.11, Triton 3.6, bf16, CUDA-graph replay, ratio to a copy of the
same element count; RESULTS.md run 9), 8192x5376: rms_norm 0.98, add_rms_norm 1.03,
add+FP8 dynamic 1.00, rms+FP8 static 0.88, rms+FP8 group 0.77, rms+INT8 dynamic 0.87;
8192x4096: 0.98, 1.04, 1.02, 0.90, 0.91, 0.90; 16384x4096: 0.99, 1.02, 1.01, 0.94, 0.95, 0.95.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Any, NamedTuple

import torch

from ..ops import registry
from ..ops.fused import add_norm_op_name, norm_op_name
from ..ops.quant import FP8_DTYPE, SCHEMES, group_scales_empty, quant_op_name

PROVIDER = "triton"
RANK = 10
MAX_HIDDEN = 65536

def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


triton = None
K = None
_IMPORT_ERROR = ""
# Import triton only where it can run: CPU-only users don't pay its import time.
if torch.cuda.is_available() or _interpret_requested():
    try:
        import triton

        from . import triton_kernel as K
    except Exception as e:  # ImportError, or a broken triton install
        triton, K = None, None
        _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


def _interpreting() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return _interpret_requested()  # pragma: no cover


INTERPRET = _interpreting()


def _availability() -> tuple[bool, str]:
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if INTERPRET:
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


SUPPORTED, REASON = _availability()
_ARG_NAMES: tuple = ()
if K is not None:
    _ARG_NAMES = tuple(K.norm_quant_kernel.arg_names)
    from triton.runtime import driver as _driver

    def _get_stream(index: int) -> int:
        return _driver.active.get_current_stream(index)
# Kernel sources: their change must change every cache key that depends on provider choice.
_HERE = pathlib.Path(__file__).parent
SOURCE = hashlib.sha256(
    b"".join((_HERE / f).read_bytes() for f in ("triton_kernel.py", "triton_ops.py"))
).hexdigest()

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _recip32(c: float) -> float:
    """fp32 ``1 / c`` (correctly rounded), exactly representable as the Python float."""
    return torch.tensor(1.0, dtype=torch.float32).div(c).item()


# ATen (CUDA) divides by a Python number as a multiply by the fp32 reciprocal.
_FP8_RECIP = _recip32(448.0)
_INT8_RECIP = _recip32(127.0)
_U8_RECIP = _recip32(255.0)


# --- per-call checks (cheap attribute tests only) ------------------------------------------

if INTERPRET:

    def _on_device(t: torch.Tensor) -> bool:
        return t.is_cpu

else:

    def _on_device(t: torch.Tensor) -> bool:
        return t.is_cuda


def _x_ok(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and _on_device(x)
        and x.dtype in _DTYPES
        and x.dim() >= 1
        and 0 < x.shape[-1] <= MAX_HIDDEN
    )


def _norm_ok(x: Any, weight: Any, variance_size: Any) -> bool:
    if not _x_ok(x):
        return False
    if weight is not None and not (_on_device(weight) and weight.dtype in _DTYPES):
        return False
    return variance_size is None or 1 <= variance_size <= x.shape[-1]


# --- scheme arguments -> kernel configuration ------------------------------------------------
# (quant mode, static scale, aux tensor (scale_ub / azp), group size, column major, ue8m0)


def _spec_fp8_static(scale):
    return (1, scale, None, 0, False, False)


def _spec_fp8_dynamic(scale_ub=None):
    return (2, None, scale_ub, 0, False, False)


def _spec_fp8_group(group_size=128, column_major_scales=False, use_ue8m0=False):
    return (3, None, None, group_size, bool(column_major_scales), bool(use_ue8m0))


def _spec_int8_static(scale, azp=None):
    return (4, scale, azp, 0, False, False)


def _spec_int8_dynamic():
    return (5, None, None, 0, False, False)


def _spec_int8_dynamic_asym():
    return (6, None, None, 0, False, False)


SPECS = {
    "fp8_static": _spec_fp8_static,
    "fp8_dynamic": _spec_fp8_dynamic,
    "fp8_group": _spec_fp8_group,
    "int8_static": _spec_int8_static,
    "int8_dynamic": _spec_int8_dynamic,
    "int8_dynamic_asym": _spec_int8_dynamic_asym,
}
_NO_QUANT = (0, None, None, 0, False, False)


def _spec_ok(spec: tuple, x: torch.Tensor) -> bool:
    group = spec[3]
    if spec[0] == 3:
        return (
            isinstance(group, int)
            and 0 < group
            and group & (group - 1) == 0
            and x.shape[-1] % group == 0
        )
    return True


# --- launch ---------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class LaunchConfig(NamedTuple):
    block_m: int  # rows per program
    tiles: tuple  # ((NG0, G0), (NG1, G1), (NG2, G2)): column tiles, NG = 0 for none
    num_warps: int
    # 0: one program per row block. > 0: persistent, at most SM count * programs_per_sm
    # programs, each looping over row blocks and prefetching the next one (PERSISTENT).
    programs_per_sm: int = 0


# Programs per "SM" under the interpreter: few, so that the persistent loop runs.
_INTERPRET_SMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(dev_index: int) -> int:
    return torch.cuda.get_device_properties(dev_index).multi_processor_count


def _grid(tokens, cfg: LaunchConfig, dev: torch.device):
    """Number of programs: one per row block, or (persistent) at most SMs * programs_per_sm.
    ``tokens`` may be a SymInt (Inductor's launch path), hence sym_min."""
    blocks = (tokens + cfg.block_m - 1) // cfg.block_m
    if cfg.programs_per_sm <= 0:
        return blocks
    if INTERPRET:
        sms = _INTERPRET_SMS
    else:
        sms = _sm_count(torch.cuda.current_device() if dev.index is None else dev.index)
    return torch.sym_min(blocks, sms * cfg.programs_per_sm)


def column_tiles(hidden: int, group: int) -> tuple[int, ...]:
    """Widths of up to three power-of-two tiles covering ``hidden`` (the last one masked).

    The top two set bits of ``hidden`` exactly, the rest padded to a power of two: 5376 ->
    (4096, 1024, 256), 2304 -> (2048, 256), 3000 -> (2048, 512, 512). One padded tile when
    that wastes < 10% of the lanes or the row is small. For per-group FP8 every width is a
    multiple of the group (hidden % group == 0 and group is a power of two).
    """
    one = _next_pow2(hidden)
    if hidden < 512 or one * 0.9 <= hidden:
        return (one,)
    w0 = 1 << (hidden.bit_length() - 1)
    rest = hidden - w0
    w1 = 1 << (rest.bit_length() - 1)
    rest -= w1
    widths = (w0, w1) if rest == 0 else (w0, w1, max(_next_pow2(rest), group or 1))
    return widths if sum(widths) <= 0.9 * one else (one,)


@functools.lru_cache(maxsize=None)
def launch_config(hidden: int, group: int) -> LaunchConfig:
    """Rows per program, column tiles and num_warps for a hidden size (group 0: per row).

    The whole row is held in registers. Small rows (QK norm, H=128) take several rows per
    program so each program still moves ~2K elements; for one power-of-two tile warps grow
    with the row so each thread keeps 8-16 values (16-byte loads for 16-bit data). Split rows
    use fewer warps (~1K lanes per warp), so the small tiles are not spread thinner than
    one 16-byte vector per thread (measured on H100 at 5376: 4 warps 0.95 of copy for
    rms_norm, 8 warps 0.80, 16 warps 0.78). Per-group FP8 keeps one padded tile where the
    split needs three tiles (slower there: many per-group reductions, 110 registers).
    """
    widths = column_tiles(hidden, group)
    if group and len(widths) > 2:
        widths = (_next_pow2(hidden),)
    lanes = sum(widths)
    block_m = max(1, 2048 // _next_pow2(lanes))
    elems = block_m * lanes
    if len(widths) > 1:
        num_warps = min(16, max(4, 1 << ((lanes // 1024).bit_length() - 1) if lanes >= 1024 else 4))
    elif elems >= 32768:
        num_warps = 32
    else:
        num_warps = min(16, max(4, 1 << ((elems // 512).bit_length() - 1) if elems >= 512 else 4))
    if group:  # per-group FP8: 8 warps beat 16 on a padded 8192 tile (H100 run 7: 0.77 vs 0.72)
        num_warps = min(num_warps, 8)
    tiles = tuple((w // group, group) if group else (1, w) for w in widths)
    tiles += ((0, 1),) * (3 - len(tiles))
    # The persistent prefetching variant (programs_per_sm > 0) is off until measured.
    return LaunchConfig(block_m, tiles, num_warps, programs_per_sm=0)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as [T, H] with unit column stride (a view when the layout allows)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, hidden)


# --- kernel launch with a cached compiled kernel ---------------------------------------------
# ``JITFunction.run`` binds and specializes ~40 arguments on every call (~30 us of Python on
# an H100 host). The compiled kernel depends only on the constexprs, num_warps, the
# argument dtypes and Triton's specializations (16-byte alignment of pointers; integers
# equal to 1, divisible by 16, or 64-bit), so those form our key; a miss goes through
# ``run`` (which compiles) and caches its CompiledKernel, a hit calls its launcher directly.

_LAUNCHERS: dict = {}
_FAST_LAUNCH = [True]


def _kernel_launch(grid0: int, dev_index: int, args: tuple, consts: tuple, num_warps: int):
    """Launch ``norm_quant_kernel`` (args: the runtime arguments, consts: the constexprs in
    signature order)."""
    ptr_bits = 0
    for t in args[:10]:
        ptr_bits |= t.data_ptr()
    # Triton specializes pointers on 16-byte alignment, ints on == 1 / % 16 == 0 (except
    # the do_not_specialize T, stride_st, stride_sg) and types every int by its size: only
    # the all-aligned case is cached, the rest goes through run.
    t, h, sx, sr, sw, st, sg = args[10:17]
    v = args[19]
    key = (dev_index, num_warps, consts, args[0].dtype, args[2].dtype, args[8].dtype,
           args[9].dtype, tuple((i == 1, i % 16 == 0) for i in (h, sx, sr, sw, v)),
           max(t, h, sx, sr, sw, st, sg, v) >= 2147483648)
    if ptr_bits & 15:
        key = None
    kernel = _LAUNCHERS.get(key) if key is not None and _FAST_LAUNCH[0] else None
    if kernel is None:
        kwargs = dict(zip(_ARG_NAMES[len(args):], consts))
        kernel = K.norm_quant_kernel[(grid0,)](*args, **kwargs, num_warps=num_warps)
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        if key is not None and _FAST_LAUNCH[0] and hasattr(kernel, "packed_metadata"):
            _LAUNCHERS[key] = kernel
        return
    stream = _get_stream(dev_index)
    rt = triton.knobs.runtime
    enter = rt.launch_enter_hook
    meta = kernel.launch_metadata((grid0, 1, 1), stream, *args, *consts) if enter else None
    kernel.run(grid0, 1, 1, stream, kernel.function, kernel.packed_metadata, meta, enter,
               rt.launch_exit_hook, *args, *consts)


def prepare_launch(x, residual, weight, eps, offset, variance_size, do_norm, store_out, spec):
    """Allocate the outputs and the kernel's arguments for one call.

    Returns ``(out | None, quant outputs tuple, residual_out | None, launch)`` where ``launch``
    is ``(grid0, args, consts, num_warps)``, or None when there are no tokens. Shared by the
    eager launch below and the Inductor-visible ``library_ops`` (triton_op) wrappers.
    """
    mode, scale_in, aux, group, column_major, ue8m0 = spec
    shape = x.shape
    hidden = shape[-1]
    dev = x.device
    out = torch.empty(shape, dtype=x.dtype, device=dev) if store_out else None
    res_out = torch.empty(shape, dtype=x.dtype, device=dev) if residual is not None else None
    q = scales = azp = None
    if mode:
        q = torch.empty(shape, dtype=FP8_DTYPE if mode <= 3 else torch.int8, device=dev)
        if mode == 3:
            scales = group_scales_empty(x, group, column_major)
        elif mode in (2, 5, 6):
            scales = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=dev)
        if mode == 6:
            azp = torch.empty((*shape[:-1], 1), dtype=torch.int32, device=dev)
    quant_out = tuple(t for t in (q, scales, azp) if t is not None)

    x2 = _rows(x, hidden)
    tokens = x2.shape[0]
    if tokens == 0:  # static shapes only: a symbolic token count takes the launch path
        return out, quant_out, res_out, None
    r2 = _rows(residual, hidden) if residual is not None else x2
    cfg = launch_config(hidden, group if mode == 3 else 0)
    if mode == 3:
        st, sg = (1, tokens) if column_major else (hidden // group, 1)
    else:
        st, sg = 1, 1
    vsize = hidden if variance_size is None else variance_size
    # Unused pointer arguments get x2 (never read or written: their constexpr switches are off).
    args = (
        x2, r2, x2 if weight is None else weight,
        x2 if out is None else out, x2 if res_out is None else res_out,
        x2 if q is None else q, x2 if scales is None else scales, x2 if azp is None else azp,
        x2 if scale_in is None else scale_in, x2 if aux is None else aux,
        tokens, hidden,
        x2.stride(0), r2.stride(0), 1 if weight is None else weight.stride(0),
        st, sg,
        float(eps), float(offset), vsize,
    )
    (ng0, g0), (ng1, g1), (ng2, g2) = cfg.tiles
    persistent = cfg.programs_per_sm > 0
    # Masks the kernel can drop: every row block full (the persistent prefetch reads past
    # the last block, so it keeps the row mask), tiles exactly as wide as the row.
    even_rows = not persistent and (cfg.block_m == 1 or (isinstance(tokens, int) and tokens % cfg.block_m == 0))
    even_cols = ng0 * g0 + ng1 * g1 + ng2 * g2 == hidden
    consts = (
        cfg.block_m, ng0, g0, ng1, g1, ng2, g2,
        residual is not None, do_norm, weight is not None, offset != 0.0, vsize != hidden,
        store_out, mode, aux is not None, ue8m0,
        not INTERPRET, not INTERPRET, _FP8_RECIP, _INT8_RECIP, _U8_RECIP,
        persistent, even_rows, even_cols,
    )
    grid0 = _grid(tokens, cfg, dev)
    return out, quant_out, res_out, (grid0, args, consts, cfg.num_warps)


def _launch(x, residual, weight, eps, offset, variance_size, do_norm, store_out, spec):
    """Run the kernel; returns (out | None, quant outputs tuple, residual_out | None)."""
    out, quant_out, res_out, launch = prepare_launch(
        x, residual, weight, eps, offset, variance_size, do_norm, store_out, spec
    )
    if launch is None:
        return out, quant_out, res_out
    grid0, args, consts, num_warps = launch
    dev = x.device
    if INTERPRET:
        kwargs = dict(zip(_ARG_NAMES[len(args):], consts))
        K.norm_quant_kernel[(grid0,)](*args, **kwargs, num_warps=num_warps)
    elif dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            _kernel_launch(grid0, dev.index, args, consts, num_warps)
    else:
        _kernel_launch(grid0, torch.cuda.current_device() if dev.index is None else dev.index,
                       args, consts, num_warps)
    return out, quant_out, res_out


def _single(outputs: tuple) -> Any:
    return outputs[0] if len(outputs) == 1 else outputs


# --- provider functions (each has its op's exact signature) ---------------------------------


def rms_norm(x, weight, eps, weight_offset=0.0, variance_size=None):
    return _launch(x, None, weight, eps, weight_offset, variance_size, True, True, _NO_QUANT)[0]


def fused_add_rms_norm(x, residual, weight, eps, weight_offset=0.0, variance_size=None):
    out, _, res_out = _launch(
        x, residual, weight, eps, weight_offset, variance_size, True, True, _NO_QUANT
    )
    return out, res_out


def _rms_norm_supports(x, weight, eps, weight_offset=0.0, variance_size=None):
    return _norm_ok(x, weight, variance_size)


def _fused_add_supports(x, residual, weight, eps, weight_offset=0.0, variance_size=None):
    return _norm_ok(x, weight, variance_size) and _on_device(residual)


def _make_scheme_providers(scheme: str) -> dict[str, tuple]:
    """(fn, supports) for quant_<s>, rms_norm_<s> and fused_add_rms_norm_<s>."""
    spec_of = SPECS[scheme]
    split = SCHEMES[scheme].split_args

    def quant(x, *args, **kwargs):
        spec = spec_of(*args, **kwargs)
        return _single(_launch(x, None, None, 0.0, 0.0, None, False, False, spec)[1])

    def quant_supports(x, *args, **kwargs):
        return _x_ok(x) and _spec_ok(spec_of(*args, **kwargs), x)

    def norm(x, weight, eps, *args, **kwargs):
        qargs, offset, vsize = split(args, kwargs)
        return _single(_launch(x, None, weight, eps, offset, vsize, True, False, spec_of(*qargs))[1])

    def norm_supports(x, weight, eps, *args, **kwargs):
        qargs, offset, vsize = split(args, kwargs)
        return _norm_ok(x, weight, vsize) and _spec_ok(spec_of(*qargs), x)

    def add_norm(x, residual, weight, eps, *args, **kwargs):
        qargs, offset, vsize = split(args, kwargs)
        _, quant_out, res_out = _launch(
            x, residual, weight, eps, offset, vsize, True, False, spec_of(*qargs)
        )
        return (*quant_out, res_out)

    def add_norm_supports(x, residual, weight, eps, *args, **kwargs):
        qargs, offset, vsize = split(args, kwargs)
        return (
            _norm_ok(x, weight, vsize)
            and _on_device(residual)
            and _spec_ok(spec_of(*qargs), x)
        )

    return {
        quant_op_name(scheme): (quant, quant_supports),
        norm_op_name(scheme): (norm, norm_supports),
        add_norm_op_name(scheme): (add_norm, add_norm_supports),
    }


def _unavailable(*args, **kwargs):
    raise RuntimeError(f"compile_norm: the triton provider cannot run here: {REASON}")


def provider_functions() -> dict[str, tuple]:
    """{op name: (fn, supports)} for all 20 ops."""
    table = {
        "rms_norm": (rms_norm, _rms_norm_supports),
        "fused_add_rms_norm": (fused_add_rms_norm, _fused_add_supports),
    }
    for scheme in SCHEMES:
        table.update(_make_scheme_providers(scheme))
    return table


FUNCTIONS = provider_functions()


def register() -> None:
    """Register the "triton" provider of every op (unsupported ones carry the reason)."""
    for op, (fn, supports) in FUNCTIONS.items():
        registry.register_provider(
            op,
            registry.Provider(
                name=PROVIDER,
                fn=fn if SUPPORTED else _unavailable,
                supported=SUPPORTED,
                supports=supports,
                rank=RANK,
                reason=REASON,
                source=SOURCE,
            ),
        )
