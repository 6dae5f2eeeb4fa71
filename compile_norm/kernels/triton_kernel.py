"""One row-wise Triton kernel for the whole RMSNorm family (imported only when triton is).

``norm_quant_kernel`` does, for ``BLOCK_M`` rows per program, in one launch:
(x's own RMSNorm, for rms_norm_add_rms_norm ->) residual add -> RMSNorm (fp32 statistics) ->
weight (16-bit "round then multiply", or Gemma's fp32 ``w + offset``) -> output rounded to
x.dtype -> quantization of that rounded value.
Each stage is switched by a ``tl.constexpr`` so every op compiles to a kernel with only its
own work. The row is loaded once and stays in registers.

The gated norm (ops/gated.py, ``GATE``) reads its gate through the residual's pointer (a
second [T, H] input, never both): ``GATE == 1`` multiplies the norm's output by
``silu(gate)`` and rounds again (Qwen3-Next); ``GATE == 2`` multiplies x by it first and
normalizes the product, per row or (``NORM_GROUPED``) per group of ``G`` columns (the tiles'
groups, as per-group FP8 uses them), then ``weight * y.to(x.dtype)`` in the promoted dtype
(``PROMOTE``: float32 for a 16-bit x with a weight of another dtype) (Mamba-2).

The raw loads (``_load_rows``) are separate from the work on them (``_process``). With
``PERSISTENT`` each program loops over row blocks pid, pid + nprog, ... and issues the loads
of its next block before processing the current one (software prefetch: a load is
asynchronous until its value is used, so the next rows' reads are in flight during this
block's math and stores). This keeps two blocks' raw tiles in registers at once.

A row is covered by up to three power-of-two column tiles ``W0 + W1 + W2 >= H`` (e.g.
5376 = 4096 + 1024 + 256, 2304 = 2048 + 256) instead of one tile padded to the next power of
two: padded lanes cost as much ALU work as real ones, and the quantizing modes are ALU bound
(8192 columns for 5376 did 1.5x the work). Each tile is 3-D ``[BLOCK_M, NG, G]``: ``NG``
groups of ``G`` columns. Per-group FP8 uses the real group size (every tile width is a
multiple of it); every other mode uses ``NG = 1, G = W`` so the same code gives per-row
statistics, and no reshape (layout shuffle) is ever needed.

Numerics copy the reference (compile_norm/ops/norm.py, quant.py) as torch executes it:
``a / b`` of two tensors is IEEE division: on the GPU ``a * (1/b)`` corrected by one
fma-Newton step, which is the correctly rounded quotient for the scales used here (``1/b``
correctly rounded and no underflow: Markstein's theorem; ``div_rn`` is a per-element
subroutine with a slow-path branch); a static scale outside the normal range falls back to
``div_rn``;
a tensor divided by a Python number is, on CUDA, a multiply by the fp32 reciprocal (ATen's
``div_true_kernel_cuda``), on CPU a true division (``SCALAR_RECIP`` picks); max/min
reductions propagate NaN like ``torch.amax``; INT8 rounds half to even. ``PRECISE`` selects
libdevice (``rint``, ``rsqrt``, ``log2``...) on the GPU; the interpreter has no libdevice
and uses exact numpy-backed equivalents instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from triton.language.extra.cuda import num_threads  # the launch's threads, a constexpr

from .quant_modes import QUANT_MODES  # noqa: F401  (the QUANT constexpr of each scheme)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(a, axis: tl.constexpr, PRECISE: tl.constexpr):
    """Max along ``axis`` that propagates NaN (tl.max on the GPU drops it)."""
    if PRECISE:
        r = tl.reduce(a, axis, _max_nan)
    else:  # interpreter: tl.max is numpy's nanmax (fast; a custom combine is very slow)
        r = tl.max(a, axis)
        r = tl.where(tl.sum((a != a).to(tl.int32), axis) > 0, float("nan"), r)
    return r


@triton.jit
def _amin(a, axis: tl.constexpr, PRECISE: tl.constexpr):
    if PRECISE:
        r = tl.reduce(a, axis, _min_nan)
    else:
        r = tl.min(a, axis)
        r = tl.where(tl.sum((a != a).to(tl.int32), axis) > 0, float("nan"), r)
    return r


@triton.jit
def _rint(v, PRECISE: tl.constexpr):
    """Round half to even (torch.round)."""
    if PRECISE:
        r = libdevice.rint(v)
    else:
        # |v| < 2**23: adding and removing 2**23 (with v's sign) rounds to an integer in
        # IEEE round-to-nearest-even; larger values are already integers.
        big = tl.where(v < 0, -8388608.0, 8388608.0)
        r = tl.where(tl.abs(v) < 8388608.0, (v + big) - big, v)
    return r


@triton.jit
def _round_bf16(v):
    """fp32 -> nearest bfloat16 value (ties to even), kept in fp32; NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _round_to(v, DT: tl.constexpr, PRECISE: tl.constexpr):
    """Round fp32 ``v`` to dtype DT (ties to even) and return it as fp32.

    Values are kept in fp32 holding exactly-representable DT values, so every later store
    is exact. The interpreter's own fp32 -> bf16 cast truncates, hence ``_round_bf16``.
    """
    if DT == tl.float32:
        r = v
    elif PRECISE or DT == tl.float16:
        r = v.to(DT).to(tl.float32)
    else:
        r = _round_bf16(v)
    return r


@triton.jit
def _widen(v, PRECISE: tl.constexpr):
    """``v.to(tl.float32)`` of a 16-bit ``v`` whose fp32 value feeds arithmetic.

    A bfloat16 is the top half of its float32, so a pair in one register widens in two
    instructions (inline PTX, two elements per register: shift the low one up, mask the high
    one). The cast's PTX first splits the pair into 16-bit registers, which ptxas turns into
    a PRMT plus a shift for the high half (after a packed bf16 multiply, for both halves).
    Not for values that are stored again as 16-bit: the compiler folds a cast pair there.
    Pairs need an even number of elements in each thread: a tile of at least two per thread
    has that (power-of-two sizes); a smaller one is cast."""
    if PRECISE and v.dtype == tl.bfloat16 and v.numel >= 2 * num_threads():
        r = tl.inline_asm_elementwise("shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000;",
                                      "=r,=r,r", [v], dtype=tl.float32, is_pure=True, pack=2)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _rewiden(v, DT: tl.constexpr, PRECISE: tl.constexpr):
    """``v``, an fp32 holding a value of DT, as ``_widen`` of that value: where v is the
    cast of a 16-bit result (a packed multiply or add), ``v.to(DT)`` folds into it."""
    if PRECISE and DT == tl.bfloat16:
        v = _widen(v.to(DT), PRECISE)
    return v


@triton.jit
def _div_scalar(a, C: tl.constexpr, C_RECIP: tl.constexpr, SCALAR_RECIP: tl.constexpr):
    """``tensor / python_number`` as torch computes it on this device."""
    if SCALAR_RECIP:
        r = a * C_RECIP
    else:
        r = tl.math.div_rn(a, tl.full(a.shape, C, tl.float32))
    return r


@triton.jit
def _sat_fp8(v, PRECISE: tl.constexpr):
    """Reference ``clamp(-448, 448).to(float8_e4m3fn)``: NaN stays NaN."""
    if PRECISE:
        # Triton converts with cvt.rn.satfinite.e4m3x2.f32: beyond +-448 (inf included)
        # saturates to +-448 and NaN stays NaN, which is the clamp (2 instructions saved).
        q = v.to(tl.float8e4nv)
    else:
        v = tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                       propagate_nan=tl.PropagateNan.ALL)
        # The interpreter's fp8 cast rounds half up without carry: round to the e4m3 grid
        # here (step 2**(e - 3), subnormal step 2**-9), so its cast is exact.
        e = ((tl.abs(v).to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        e = tl.maximum(e, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
        r = _rint(v * inv, PRECISE) * step
        # _rint turns -0 into +0 (-0 + 2**23 - 2**23): give the result v's sign bit back
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000
        r = (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        # A NaN whose top mantissa bits are 111 (and the next 0) is what that cast turns
        # into the e4m3 NaN code 0x7F.
        nan = tl.full(v.shape, 0x7FF00000, tl.int32).to(tl.float32, bitcast=True)
        q = tl.where(v != v, nan, r)
    return q


@triton.jit
def _sat_int8(v):
    """Reference: NaN -> 0, clamp to [-128, 127], to int8 (v already integral)."""
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    return v.to(tl.int8)


@triton.jit
def _int8_rn(t):
    """``t`` rounded half to even to int8, saturating, NaN -> 0 (cvt.rni.s32.f32 and a clamp).

    Four elements per register where each thread holds a multiple of four: ``cvt.rni.s8.f32``
    clamps to the int8 range itself, and three PRMTs pack the bytes in element order (the
    lowest byte is the first element), instead of two integer clamps per element and the
    compiler's byte shuffles."""
    if t.numel >= 4 * num_threads():
        q = tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, c, d, lo, hi;
            cvt.rni.s8.f32 a, $1;
            cvt.rni.s8.f32 b, $2;
            cvt.rni.s8.f32 c, $3;
            cvt.rni.s8.f32 d, $4;
            prmt.b32 lo, a, b, 0x0040;
            prmt.b32 hi, c, d, 0x0040;
            prmt.b32 $0, lo, hi, 0x5410;
            }""",
            "=r,r,r,r,r", [t], dtype=tl.int8, is_pure=True, pack=4)
    else:
        i = libdevice.float2int_rn(t)
        q = tl.minimum(tl.maximum(i, -128), 127).to(tl.int8)
    return q


@triton.jit
def _recip(b):
    """Correctly rounded ``1 / b``."""
    return tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)


@triton.jit
def _fast_div(a, b, rb, FAST: tl.constexpr, GUARD: tl.constexpr, SIGNED_ZERO: tl.constexpr):
    """IEEE ``a / b`` given ``rb = _recip(b)``; ``b`` and ``rb`` broadcast to ``a``; ``b > 0``
    unless SIGNED_ZERO.

    ``q0 = a * rb`` corrected by one fma-Newton step, written so that it costs two fmas per
    element and keeps the sign of a zero quotient: ``r = q0 * b - a`` (minus the residual
    ``a - q0 * b``: round to nearest is symmetric, so ``q0 + r * (-rb)`` is the usual
    ``q0 + (a - q0 * b) * rb`` bit for bit), its ``-a`` a free operand negation (``a * -1.0``
    is LLVM's fneg; Triton's ``-a`` is ``0 - a``, an instruction that turns -0 into +0), and
    ``-rb`` negated once per row or group. With ``a = ±0`` (and ``b > 0``) ``r`` is +0 and
    the second fma adds ``-0`` to ``q0 = ±0``: ±0, the quotient's sign, with no copysign.
    GUARD False: the caller's scale bounds every quotient (a dynamic scale is at least
    amax / 448, or / 127), so only a non-finite scale can make the correction NaN; with b
    replaced by 0 there the result is ``q0 + a * rb``: q0 when b = inf (rb = 0: a / inf = 0,
    inf / inf = NaN), NaN when b is NaN, as the division gives. SIGNED_ZERO: b may be
    negative (a scale bound the caller does not check), where a zero quotient takes q0's
    sign by a copysign.
    """
    if FAST:
        if not GUARD:
            b = tl.where(tl.abs(b) < float("inf"), b, 0.0)
        nrb = tl.broadcast_to(rb * -1.0, a.shape)
        q0 = a * tl.broadcast_to(rb, a.shape)
        q = tl.math.fma(tl.math.fma(q0, tl.broadcast_to(b, a.shape), a * -1.0), nrb, q0)
        if GUARD:
            # b = 0 / inf, a = inf, overflow: the correction is NaN; a * (1/b) is the answer
            q = tl.where(q == q, q, q0)
        if SIGNED_ZERO:
            q = libdevice.copysign(q, q0)
    else:  # div_rn (the interpreter has no true fma: there it is numpy's division)
        q = tl.math.div_rn(a, tl.broadcast_to(b, a.shape))
    return q


@triton.jit
def _tile(C0: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, H, EVEN_COLS: tl.constexpr):
    """Group index ``[NG]``, columns ``[NG, G]`` and column mask of the tile at column C0.
    EVEN_COLS (the tiles cover exactly H): a constant mask, which the compiler folds away
    (no per-element compares, unpredicated vector loads and stores)."""
    gidx = tl.arange(0, NG)
    cols = C0 + gidx[:, None] * G + tl.arange(0, G)[None, :]
    if EVEN_COLS:
        cmask = tl.full(cols.shape, 1, tl.int1)
    else:
        cmask = cols < H
    return gidx, cols, cmask


@triton.jit
def _row_mask(rows, T, EVEN_ROWS: tl.constexpr):
    """``rows < T``; constant when every block is full (EVEN_ROWS)."""
    if EVEN_ROWS:
        rmask = tl.full(rows.shape, 1, tl.int1)
    else:
        rmask = rows < T
    return rmask


@triton.jit
def _row_offsets(rows, OFFSETS_64: tl.constexpr):
    """The row indices that address memory: int64 where an offset (row * stride + column,
    of any tensor the kernel reads or writes) may pass 2**31, else the int32 rows (a 32-bit
    multiply-add per address instead of a 64-bit one: up to 1 instruction per element)."""
    if OFFSETS_64:
        r = rows.to(tl.int64)
    else:
        r = rows
    return r


@triton.jit
def _tile_mask(rmask, cmask):
    return rmask[:, None, None] & cmask[None, :, :]


@triton.jit
def _load_raw(ptr, rows_off, stride, cols, mask):
    """One tile as stored, not converted: nothing here uses the values, so the load stays
    in flight until the caller does (what the persistent loop's prefetch relies on)."""
    return tl.load(ptr + rows_off[:, None, None] * stride + cols[None, :, :], mask=mask,
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_tile(x_ptr, r_ptr, rows_off, rmask, C0: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
               H, stride_x, stride_r, HAS_R: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Raw x and second input (residual or gate) of one tile; without HAS_R the second is
    x's placeholder."""
    _, cols, cmask = _tile(C0, NG, G, H, EVEN_COLS)
    mask = _tile_mask(rmask, cmask)
    x = _load_raw(x_ptr, rows_off, stride_x, cols, mask)
    r = x
    if HAS_R:
        r = _load_raw(r_ptr, rows_off, stride_r, cols, mask)
    return x, r


@triton.jit
def _load_rows(x_ptr, r_ptr, rows, T, H, stride_x, stride_r,
               NG0: tl.constexpr, G0: tl.constexpr, NG1: tl.constexpr, G1: tl.constexpr,
               NG2: tl.constexpr, G2: tl.constexpr, HAS_R: tl.constexpr,
               EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr, OFFSETS_64: tl.constexpr):
    """Raw tiles (x0, r0, x1, r1, x2, r2) of rows ``rows`` (masked at T and H).

    Absent tensors (no residual or gate, NG1 / NG2 = 0) are placeholders (an earlier tile, never
    read by ``_process``), so every call site has the same six names and the persistent
    loop carries only loads that exist (unused loop values are dropped by the compiler).
    """
    rmask = _row_mask(rows, T, EVEN_ROWS)
    rows_off = _row_offsets(rows, OFFSETS_64)
    C1: tl.constexpr = NG0 * G0
    C2: tl.constexpr = C1 + NG1 * G1
    x0, r0 = _load_tile(x_ptr, r_ptr, rows_off, rmask, 0, NG0, G0, H, stride_x, stride_r,
                        HAS_R, EVEN_COLS)
    x1, r1 = x0, r0
    if NG1 > 0:
        x1, r1 = _load_tile(x_ptr, r_ptr, rows_off, rmask, C1, NG1, G1, H, stride_x, stride_r,
                            HAS_R, EVEN_COLS)
    x2, r2 = x0, r0
    if NG2 > 0:
        x2, r2 = _load_tile(x_ptr, r_ptr, rows_off, rmask, C2, NG2, G2, H, stride_x, stride_r,
                            HAS_R, EVEN_COLS)
    return x0, r0, x1, r1, x2, r2


@triton.jit
def _add_rn(a, b, RN: tl.constexpr, PRECISE: tl.constexpr):
    """``a + b`` in fp32; RN: as PTX ``add.rn.f32``, which neither LLVM nor ptxas fuses with
    the multiply that made ``a`` (rms_norm_add_rms_norm: x's norm ends in ``y * w``; fused
    into one fma it would round once where torch and the two kernels round twice)."""
    if RN and PRECISE:
        r = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = a + b
    return r


@triton.jit
def _add_res(x, r, res_out_ptr, rows_off, cols, mask, H, X_DT: tl.constexpr,
             HAS_RES: tl.constexpr, PRECISE: tl.constexpr, RN: tl.constexpr = False):
    """The (residual-added) input of one tile in fp32; stores residual_out. RN: ``x`` is a
    computed fp32 value (``_add_rn``)."""
    if HAS_RES:
        # x + residual in x.dtype: exact fp32 sum, rounded once (as torch does); for two
        # 16-bit inputs the compiler makes it a packed 16-bit add, stored as is
        xf = _round_to(_add_rn(x.to(tl.float32), r.to(tl.float32), RN, PRECISE), X_DT, PRECISE)
        tl.store(res_out_ptr + rows_off[:, None, None] * H + cols[None, :, :], xf, mask=mask)
        xf = _rewiden(xf, X_DT, PRECISE)
    else:
        xf = _widen(x, PRECISE)
    return xf


@triton.jit
def _squares(xf, cols, V, HAS_VSIZE: tl.constexpr):
    """The squares a sum of squares adds (only the first V columns with HAS_VSIZE)."""
    sq = xf * xf
    if HAS_VSIZE:
        sq = tl.where(cols[None, :, :] < V, sq, 0.0)
    return sq


@triton.jit
def _sumsq(xf, cols, V, HAS_VSIZE: tl.constexpr, PER_GROUP: tl.constexpr = False):
    """Sum of squares per row ``[BLOCK_M]``, or per [row, group] ``[BLOCK_M, NG]``."""
    sq = _squares(xf, cols, V, HAS_VSIZE)
    if PER_GROUP:
        r = tl.sum(sq, axis=2)
    else:
        r = tl.sum(tl.sum(sq, axis=2), axis=1)
    return r


@triton.jit
def _fold(t, W: tl.constexpr):
    """One row's tile ``[1, NG, G]`` as ``[1, NG * G / W, W]`` in whatever element order
    keeps the registers where they are: a row-wide statistic reduces it along axis 1 inside
    each thread first, so the tiles of a split row meet as ``[1, W]`` partials and are reduced
    across warps once (not once per tile; nor with the tiles' layouts tied together, which
    moved them through shared memory)."""
    return tl.reshape(t, [t.shape[0], t.shape[1] * t.shape[2] // W, W], can_reorder=True)


@triton.jit
def _folded_sumsq(xf, cols, V, HAS_VSIZE: tl.constexpr, W: tl.constexpr):
    """Squares of one row's tile summed down to ``[1, W]`` (``_fold``)."""
    return tl.sum(_fold(_squares(xf, cols, V, HAS_VSIZE), W), axis=1)


@triton.jit
def _folded_stats(v, mask, W: tl.constexpr, QUANT: tl.constexpr, PRECISE: tl.constexpr):
    """``_stats`` of one row's tile as ``[1, W]`` partials (``_fold``)."""
    if QUANT == 6:
        s1 = _amax(_fold(tl.where(mask, v, float("-inf")), W), 1, PRECISE)
        s2 = _amin(_fold(tl.where(mask, v, float("inf")), W), 1, PRECISE)
    else:
        s1 = _amax(_fold(tl.abs(v), W), 1, PRECISE)  # masked lanes hold 0
        s2 = s1
    return s1, s2


@triton.jit
def _row_sumsq(v0, v1, v2, cols0, cols1, cols2, V, NG1: tl.constexpr, NG2: tl.constexpr,
               HAS_VSIZE: tl.constexpr, FOLD: tl.constexpr, WF: tl.constexpr):
    """Sum of squares per row ``[BLOCK_M]`` over a row's tiles (absent ones: NG = 0)."""
    if FOLD:  # the tiles' partials, then one reduction across warps
        part = _folded_sumsq(v0, cols0, V, HAS_VSIZE, WF)
        part += _folded_sumsq(v1, cols1, V, HAS_VSIZE, WF)
        if NG2 > 0:
            part += _folded_sumsq(v2, cols2, V, HAS_VSIZE, WF)
        ss = tl.sum(part, axis=1)
    else:
        ss = _sumsq(v0, cols0, V, HAS_VSIZE)
        if NG1 > 0:
            ss += _sumsq(v1, cols1, V, HAS_VSIZE)
        if NG2 > 0:
            ss += _sumsq(v2, cols2, V, HAS_VSIZE)
    return ss


@triton.jit
def _rstd(ss, V, eps, PRECISE: tl.constexpr):
    """``rsqrt(mean + eps)`` of a sum of squares over ``V`` columns."""
    var = ss / V
    if PRECISE:
        r = libdevice.rsqrt(var + eps)
    else:
        r = tl.math.rsqrt(var + eps)
    return r


@triton.jit
def _group_rstd(v, cols, gidx, C0: tl.constexpr, G: tl.constexpr, H, V, eps,
                EVEN_COLS: tl.constexpr, PRECISE: tl.constexpr):
    """``rstd`` of each [row, group] of a tile, ``[BLOCK_M, NG, 1]``. Padding groups (past
    H) get 0, not ``rsqrt(eps)`` (inf for eps = 0: their lanes would be NaN, not the 0 the
    quantization's statistics rely on)."""
    r = _rstd(_sumsq(v, cols, V, False, True), V, eps, PRECISE)
    if not EVEN_COLS:
        r = tl.where((C0 + gidx * G < H)[None, :], r, 0.0)
    return r[:, :, None]


@triton.jit
def _silu(g, PRECISE: tl.constexpr):
    """``F.silu(gate.float())`` as ATen computes it: ``g / (1 + exp(-g))``, IEEE division,
    the accurate exp (libdevice on the GPU; tl.exp there is the ex2.approx path)."""
    g = _widen(g, PRECISE)
    if PRECISE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    return tl.math.div_rn(g, 1.0 + e)


@triton.jit
def _gate_input(xf, g, GATE: tl.constexpr, PRECISE: tl.constexpr):
    """The value normalized: x, or with the gate before the norm ``x * silu(gate)`` (fp32).
    Masked lanes stay 0 (x and gate load as 0, silu(0) = 0)."""
    if GATE == 2:
        xf = xf * _silu(g, PRECISE)
    return xf


@triton.jit
def _load_weight(w_ptr, cols, cmask, stride_w, ONE_ROW: tl.constexpr):
    """One tile of a weight, ``[1, NG, G]`` (read before the row's reduction with
    EARLY_LOADS, just before its use otherwise)."""
    if ONE_ROW:
        # one row: loaded as the tile's shape, so Triton gives it x's layout; a 2-D load
        # gets its own (8 per thread where a quantized store takes 16) and a conversion
        # through shared memory (stores, a barrier, loads)
        w = tl.load(w_ptr + cols[None, :, :] * stride_w, mask=cmask[None, :, :],
                    other=0.0, eviction_policy="evict_last")
    else:  # rows of their own shape: a [1, NG, G] load would set the tiles' layout
        w = tl.load(w_ptr + cols * stride_w, mask=cmask, other=0.0,
                    eviction_policy="evict_last")[None, :, :]
    return w


@triton.jit
def _weights(w_ptr, stride_w, H, NG0: tl.constexpr, G0: tl.constexpr, NG1: tl.constexpr,
             G1: tl.constexpr, NG2: tl.constexpr, G2: tl.constexpr, ONE_ROW: tl.constexpr,
             EVEN_COLS: tl.constexpr):
    """The weight's tiles (w0, w1, w2); absent tiles are placeholders (never read)."""
    C1: tl.constexpr = NG0 * G0
    C2: tl.constexpr = C1 + NG1 * G1
    _, cols0, cm0 = _tile(0, NG0, G0, H, EVEN_COLS)
    w0 = _load_weight(w_ptr, cols0, cm0, stride_w, ONE_ROW)
    w1, w2 = w0, w0
    if NG1 > 0:
        _, cols1, cm1 = _tile(C1, NG1, G1, H, EVEN_COLS)
        w1 = _load_weight(w_ptr, cols1, cm1, stride_w, ONE_ROW)
    if NG2 > 0:
        _, cols2, cm2 = _tile(C2, NG2, G2, H, EVEN_COLS)
        w2 = _load_weight(w_ptr, cols2, cm2, stride_w, ONE_ROW)
    return w0, w1, w2


@triton.jit
def _after(x, dep, zero, PRECISE: tl.constexpr):
    """``x`` unchanged, made to depend on ``dep``'s value (and on what ``zero`` depends on,
    ``_unfoldable_zero``): its math then waits for those loads, and ptxas issues them next to
    x's. Without it ptxas sinks the weight's loads below x's math (it weighs registers, not
    memory latency), so a small grid (decode) waits for a second memory round trip after its
    reduction.

    ``x ^ (dep & zero)``: one LOP3 per register of two 16-bit elements; otherwise a select
    on ``zero != 0``."""
    if PRECISE and x.dtype.primitive_bitwidth == 16 and dep.dtype.primitive_bitwidth == 16 \
            and x.numel >= 2 * num_threads():
        z = tl.broadcast_to(zero.to(x.dtype, bitcast=True), x.shape)
        r = tl.inline_asm_elementwise("and.b32 $0, $2, $3; xor.b32 $0, $0, $1;", "=r,r,r,r",
                                      [x, dep.to(x.dtype, bitcast=True), z], dtype=x.dtype,
                                      is_pure=True, pack=2)
    else:
        r = tl.where(zero != 0, dep.to(x.dtype), x)
    return r


@triton.jit
def _unfoldable_zero(T, s, HAS_S: tl.constexpr):
    """An int16 0 that ptxas cannot fold (from ``T < 0``), made to depend on the fp32 scalar
    ``s`` too when HAS_S (a static scale: ``_after`` then also waits for its load)."""
    z = tl.zeros([], tl.int16)
    zero = tl.where(T < 0, z + 1, z)  # (T may be a Python int: Inductor's mutation analysis)
    if HAS_S:
        zero = zero & s.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int16)
    return zero


@triton.jit
def _normed(xf, g, rstd, w, out_ptr, rows_off, cols, mask, H, offset,
            X_DT: tl.constexpr, HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr,
            STORE_OUT: tl.constexpr, PRECISE: tl.constexpr, GATE: tl.constexpr,
            PROMOTE: tl.constexpr):
    """The normalized, weighted (and gated) tile as the op returns it: rounded to x.dtype,
    or fp32 where PROMOTE (kept in fp32); stores ``out``. ``rstd`` broadcasts to the tile
    (``[BLOCK_M, 1, 1]`` per row, ``[BLOCK_M, NG, 1]`` per group); ``g`` is the raw gate;
    ``w`` the weight tile (``_load_weight``; a placeholder without HAS_WEIGHT)."""
    y = xf * rstd
    if GATE == 2:
        # Mamba: weight * y.to(x.dtype) in the promoted dtype; the fp32 product of two 16-bit
        # values is exact, so rounding it once is torch's 16-bit multiply
        v = _round_to(y, X_DT, PRECISE)
        if HAS_WEIGHT:
            v = v * w.to(tl.float32)
            if not PROMOTE:
                v = _round_to(v, X_DT, PRECISE)
    elif HAS_WEIGHT:
        if W_OFFSET:
            y = y * (_widen(w, PRECISE) + offset)
            v = _round_to(y, X_DT, PRECISE)
        else:
            # y.to(w.dtype) * w in w.dtype: the fp32 product of two 16-bit values is
            # exact, so rounding it once equals torch's 16-bit multiply.
            W_DT: tl.constexpr = w.dtype
            y = _round_to(y, W_DT, PRECISE) * w.to(tl.float32)
            y = _round_to(y, W_DT, PRECISE)
            if W_DT == X_DT:  # already a value of x.dtype
                v = y
            else:
                v = _round_to(y, X_DT, PRECISE)
    else:
        v = _round_to(y, X_DT, PRECISE)
    if GATE == 1:  # Qwen3-Next: (norm(x).float() * silu(gate.float())).to(x.dtype)
        v = _round_to(v * _silu(g, PRECISE), X_DT, PRECISE)
    if STORE_OUT:
        tl.store(out_ptr + rows_off[:, None, None] * H + cols[None, :, :], v, mask=mask)
    return v


@triton.jit
def _x_normed(x0, x1, x2, xw0, xw1, xw2, H, x_eps, x_offset,
              NG0: tl.constexpr, G0: tl.constexpr, NG1: tl.constexpr, G1: tl.constexpr,
              NG2: tl.constexpr, G2: tl.constexpr, X_DT: tl.constexpr, FOLD: tl.constexpr,
              WF: tl.constexpr, W_OFFSET: tl.constexpr, EVEN_COLS: tl.constexpr,
              PRECISE: tl.constexpr):
    """rms_norm(x, x_weight) of a row block's raw tiles (``xw*``: x_weight's tiles), rounded
    to x.dtype and kept in fp32 (rms_norm_add_rms_norm adds it to the residual): the same
    statistics and weight arithmetic as the norm below, so its bits are the rms_norm
    kernel's."""
    C1: tl.constexpr = NG0 * G0
    C2: tl.constexpr = C1 + NG1 * G1
    _, cols0, cm0 = _tile(0, NG0, G0, H, EVEN_COLS)
    v0 = _widen(x0, PRECISE)
    v1, cols1 = v0, cols0
    v2, cols2 = v0, cols0
    if NG1 > 0:
        _, cols1, _ = _tile(C1, NG1, G1, H, EVEN_COLS)
        v1 = _widen(x1, PRECISE)
    if NG2 > 0:
        _, cols2, _ = _tile(C2, NG2, G2, H, EVEN_COLS)
        v2 = _widen(x2, PRECISE)
    ss = _row_sumsq(v0, v1, v2, cols0, cols1, cols2, H, NG1, NG2, False, FOLD, WF)
    rs = _rstd(ss, H, x_eps, PRECISE)[:, None, None]
    # no store (STORE_OUT False): the out pointer, offsets and mask are placeholders
    y0 = _normed(v0, v0, rs, xw0, x0, cols0, cols0, cm0, H, x_offset,
                 X_DT, True, W_OFFSET, False, PRECISE, 0, False)
    y1, y2 = y0, y0
    if NG1 > 0:
        y1 = _normed(v1, v1, rs, xw1, x0, cols1, cols1, cm0, H, x_offset,
                     X_DT, True, W_OFFSET, False, PRECISE, 0, False)
    if NG2 > 0:
        y2 = _normed(v2, v2, rs, xw2, x0, cols2, cols2, cm0, H, x_offset,
                     X_DT, True, W_OFFSET, False, PRECISE, 0, False)
    return y0, y1, y2


@triton.jit
def _stats(v, mask, QUANT: tl.constexpr, PRECISE: tl.constexpr):
    """Per [row, group] statistics: (amax, amax) or, asymmetric INT8, (max, min)."""
    if QUANT == 6:
        s1 = _amax(tl.where(mask, v, float("-inf")), 2, PRECISE)
        s2 = _amin(tl.where(mask, v, float("inf")), 2, PRECISE)
    else:
        # masked lanes hold 0 (loaded as 0, and every stage maps 0 to 0): no select needed
        s1 = _amax(tl.abs(v), 2, PRECISE)
        s2 = s1
    return s1, s2


@triton.jit
def _token_stats(v, mask, NG: tl.constexpr, QUANT: tl.constexpr, PRECISE: tl.constexpr):
    """Per-row statistics ``[BLOCK_M, 1]`` of one tile (its NG groups merged: a tile holds
    several only under a grouped gated norm)."""
    s1, s2 = _stats(v, mask, QUANT, PRECISE)
    if NG > 1:
        s1 = _amax(s1, 1, PRECISE)[:, None]
        if QUANT == 6:
            s2 = _amin(s2, 1, PRECISE)[:, None]
        else:
            s2 = s1
    return s1, s2


@triton.jit
def _merge(a1, a2, b1, b2, QUANT: tl.constexpr):
    """Statistics of two tiles of the same rows (NaN propagates)."""
    m1 = _max_nan(a1, b1)
    if QUANT == 6:
        m2 = _min_nan(a2, b2)
    else:
        m2 = m1
    return m1, m2


@triton.jit
def _fp8_scale(amax, X_DT: tl.constexpr, SCALE_FORM: tl.constexpr, MIN_AT: tl.constexpr,
               MIN_VALUE: tl.constexpr, INV_MIN: tl.constexpr, SCALE_X_DT: tl.constexpr,
               PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr, FP8_RECIP: tl.constexpr):
    """The dynamic FP8 scale of ``amax`` (quant.fp8_dynamic_scale; "inverse": 448 / amax).

    MIN_AT 0: no minimum, 1: on the scale, 2: on amax. "inverse" (SCALE_FORM 2; 3: rounded
    down to a power of two) is the float32 quotient (equal to the reference's float64 one,
    see quant.fp8_kernel_scale) and its float64 clamp is ``amax < MIN_VALUE -> INV_MIN``;
    NaN stays NaN (the compare is false).
    """
    if SCALE_FORM >= 2:
        scale = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
        if MIN_AT != 0:
            scale = tl.where(amax < MIN_VALUE, INV_MIN, scale)
        if SCALE_FORM == 3:  # the reference's exp2(floor(log2(r)))
            if PRECISE:
                scale = libdevice.exp2(libdevice.floor(libdevice.log2(scale)))
            else:
                scale = tl.math.exp2(tl.math.floor(tl.math.log2(scale)))
    else:
        if MIN_AT == 2:
            amax = tl.maximum(amax, MIN_VALUE, propagate_nan=tl.PropagateNan.ALL)
        scale = _div_scalar(amax, 448.0, FP8_RECIP, SCALAR_RECIP)
        if SCALE_X_DT:
            scale = _round_to(scale, X_DT, PRECISE)
        if MIN_AT == 1:
            scale = tl.maximum(scale, MIN_VALUE, propagate_nan=tl.PropagateNan.ALL)
    return scale


@triton.jit
def _dyn_scale(s1, s2, aux_in_ptr, QUANT: tl.constexpr, HAS_AUX: tl.constexpr,
               UE8M0: tl.constexpr, PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr,
               FP8_RECIP: tl.constexpr, INT8_RECIP: tl.constexpr, U8_RECIP: tl.constexpr,
               X_DT: tl.constexpr, SCALE_FORM: tl.constexpr, MIN_AT: tl.constexpr,
               MIN_VALUE: tl.constexpr, INV_MIN: tl.constexpr, SCALE_X_DT: tl.constexpr):
    """(scale, what ``_quantize`` takes with it, azp) from the statistics of a dynamic mode:
    ``1 / scale``, or for FP8 "inverse" the stored inverse scale itself."""
    if QUANT == 2 or QUANT == 3:
        amax = s1
        if HAS_AUX:
            amax = tl.minimum(amax, tl.load(aux_in_ptr), propagate_nan=tl.PropagateNan.ALL)
        scale = _fp8_scale(amax, X_DT, SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT,
                           PRECISE, SCALAR_RECIP, FP8_RECIP)
        if UE8M0:
            if PRECISE:
                scale = libdevice.exp2(libdevice.ceil(libdevice.log2(scale)))
            else:
                scale = tl.math.exp2(tl.math.ceil(tl.math.log2(scale)))
        azp = scale
    elif QUANT == 5:
        scale = _div_scalar(s1, 127.0, INT8_RECIP, SCALAR_RECIP)
        scale = tl.maximum(scale, 1e-10, propagate_nan=tl.PropagateNan.ALL)
        azp = scale
    else:  # 6
        scale = _div_scalar(s1 - s2, 255.0, U8_RECIP, SCALAR_RECIP)
        scale = tl.maximum(scale, 1e-10, propagate_nan=tl.PropagateNan.ALL)
        azp = _rint(-128.0 - tl.math.div_rn(s2, scale), PRECISE)
        azp = tl.where(azp != azp, 0.0, azp)
    if SCALE_FORM >= 2:
        rscale = scale
    else:
        rscale = _recip(scale)
    return scale, rscale, azp


@triton.jit
def _quantize(v, mask, q_ptr, rows_off, cols, H, scale, rscale, azp, aux_in_ptr,
              QUANT: tl.constexpr, HAS_AUX: tl.constexpr, PRECISE: tl.constexpr,
              FAST: tl.constexpr, SCALE_FORM: tl.constexpr):
    """Quantize one tile and store it. ``scale`` / ``rscale`` / ``azp`` broadcast to v.
    FP8 SCALE_FORM 1 / 2 multiply by ``rscale`` (``reciprocal(scale)`` / the inverse scale)."""
    qoffs = q_ptr + rows_off[:, None, None] * H + cols[None, :, :]
    # Dynamic scales bound the quotient, except with scale_ub (fp8 dynamic) or an
    # asymmetric range (int8 asym: min and max far from 0): those keep the per-element guard.
    GUARD: tl.constexpr = QUANT == 1 or QUANT == 4 or QUANT == 6 or HAS_AUX
    if SCALE_FORM != 0:
        t = v * rscale
    else:
        t = _fast_div(v, scale, rscale, FAST, GUARD, QUANT <= 3 and HAS_AUX)
    if QUANT <= 3:  # fp8
        q = _sat_fp8(t, PRECISE)
    elif PRECISE and (QUANT == 5 or (QUANT == 4 and not HAS_AUX)):
        # cvt.rni.s32.f32 rounds half to even, saturates and maps NaN to 0: with an int
        # clamp it is the reference's round / NaN -> 0 / clamp in 3 instructions, not 6.
        q = _int8_rn(t)
    else:
        t = _rint(t, PRECISE)
        if QUANT == 4:
            if HAS_AUX:
                t = t + tl.load(aux_in_ptr).to(tl.float32)
        elif QUANT == 6:
            t = t + azp
        q = _sat_int8(t)
    tl.store(qoffs, q, mask=mask)


@triton.jit
def _group_tile(v, mask, rmask, rows_off, gidx, cols, C0: tl.constexpr, G: tl.constexpr, H,
                q_ptr, s_ptr, aux_in_ptr, stride_st, stride_sg,
                UE8M0: tl.constexpr, PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr,
                FP8_RECIP: tl.constexpr, X_DT: tl.constexpr, SCALE_FORM: tl.constexpr,
                MIN_AT: tl.constexpr, MIN_VALUE: tl.constexpr, INV_MIN: tl.constexpr,
                SCALE_X_DT: tl.constexpr):
    """Per-group FP8 of one tile: its groups' scales are its own."""
    s1, s2 = _stats(v, mask, 3, PRECISE)
    scale, rscale, azp = _dyn_scale(s1, s2, aux_in_ptr, 3, False, UE8M0, PRECISE, SCALAR_RECIP,
                                    FP8_RECIP, 1.0, 1.0, X_DT, SCALE_FORM, MIN_AT, MIN_VALUE,
                                    INV_MIN, SCALE_X_DT)
    g = C0 // G + gidx
    smask = rmask[:, None] & (g * G < H)[None, :]
    tl.store(s_ptr + rows_off[:, None] * stride_st + g[None, :] * stride_sg, scale, mask=smask)
    _quantize(v, mask, q_ptr, rows_off, cols, H, scale[:, :, None], rscale[:, :, None], azp,
              aux_in_ptr, 3, False, PRECISE, PRECISE, SCALE_FORM)


@triton.jit
def _mx_scale(amax, MX_SCALE: tl.constexpr, PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr,
              FP8_RECIP: tl.constexpr):
    """(E8M0 code as int32, the factor the elements are multiplied by) of MX blocks with
    this amax, as ops/schemes/mxfp8.py computes them (``MX_SCALE``: its SCALING_MODES)."""
    if MX_SCALE == 3:  # rceil: ceil(log2(amax / 448)), elements times 2^(127 - code)
        descale = _div_scalar(amax, 448.0, FP8_RECIP, SCALAR_RECIP)
        if PRECISE:
            lg = libdevice.ceil(libdevice.log2(descale))
        else:
            lg = tl.math.ceil(tl.math.log2(descale))
        code = (tl.minimum(tl.maximum(lg, -127.0), 127.0) + 127.0).to(tl.int32)
        code = tl.where(descale == float("inf"), 254, code)
        code = tl.where(descale != descale, 255, code)
        pow2 = ((254 - tl.minimum(tl.maximum(code, 1), 253)) << 23).to(tl.float32, bitcast=True)
        factor = tl.where(code == 0, 1.0, tl.where(code == 254, 5.877471754111438e-39, pow2))
        factor = tl.where(code == 255, descale, factor)
    else:  # floor / ceil / even: from amax's exponent bits, elements divided by 2^(code - 127)
        bits = amax.to(tl.int32, bitcast=True)
        if MX_SCALE == 2:  # even: the mantissa rounded to 3 bits first
            bits = (bits + (1 << 19)) & -8388608
        pow2 = ((bits >> 23) & 0xFF) - 127
        if MX_SCALE == 1:  # ceil: up unless amax is a power of two
            pow2 += ((bits & 0x7FFFFF) > 0).to(tl.int32)
        code = tl.minimum(tl.maximum(pow2 - 8, -127), 128) + 127
        code = tl.where(amax != amax, 255, code)
        scale = tl.maximum((code << 23).to(tl.float32, bitcast=True), 1.1754943508222875e-38)
        # a power of two (or inf): its reciprocal is exact, so the product is the quotient
        factor = _recip(scale)
    return code, factor


@triton.jit
def _mx_tile(v, mask, rmask, rows_off, gidx, cols, C0: tl.constexpr, G: tl.constexpr, H,
             q_ptr, s_ptr, stride_st, stride_sg, MX_SCALE: tl.constexpr, PRECISE: tl.constexpr,
             SCALAR_RECIP: tl.constexpr, FP8_RECIP: tl.constexpr):
    """MXFP8 of one tile: its blocks' E8M0 codes (uint8) and e4m3 elements."""
    amax = _amax(tl.abs(v), 2, PRECISE)  # masked lanes hold 0
    code, factor = _mx_scale(amax, MX_SCALE, PRECISE, SCALAR_RECIP, FP8_RECIP)
    g = C0 // G + gidx
    smask = rmask[:, None] & (g * G < H)[None, :]
    tl.store(s_ptr + rows_off[:, None] * stride_st + g[None, :] * stride_sg, code.to(tl.uint8),
             mask=smask)
    q = _sat_fp8(v * factor[:, :, None], PRECISE)
    tl.store(q_ptr + rows_off[:, None, None] * H + cols[None, :, :], q, mask=mask)


@triton.jit
def _process(x0, r0, x1, r1, x2, r2, rows, T, H, x_ptr, w_ptr, out_ptr, res_out_ptr, q_ptr,
             s_ptr, azp_ptr, scale_in_ptr, aux_in_ptr, stride_w, stride_st, stride_sg, eps,
             offset, V,
             NG0: tl.constexpr, G0: tl.constexpr, NG1: tl.constexpr, G1: tl.constexpr,
             NG2: tl.constexpr, G2: tl.constexpr,
             HAS_RES: tl.constexpr, DO_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
             W_OFFSET: tl.constexpr, HAS_VSIZE: tl.constexpr, STORE_OUT: tl.constexpr,
             QUANT: tl.constexpr, HAS_AUX: tl.constexpr, UE8M0: tl.constexpr,
             PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr, FP8_RECIP: tl.constexpr,
             INT8_RECIP: tl.constexpr, U8_RECIP: tl.constexpr, EVEN_ROWS: tl.constexpr,
             EVEN_COLS: tl.constexpr, MX_SCALE: tl.constexpr, SCALE_FORM: tl.constexpr,
             MIN_AT: tl.constexpr, MIN_VALUE: tl.constexpr, INV_MIN: tl.constexpr,
             SCALE_X_DT: tl.constexpr, GATE: tl.constexpr, NORM_GROUPED: tl.constexpr,
             PROMOTE: tl.constexpr, xw_ptr, stride_xw, x_eps, x_offset,
             X_NORM: tl.constexpr, X_W_OFFSET: tl.constexpr, OFFSETS_64: tl.constexpr,
             EARLY_LOADS: tl.constexpr):
    """Everything after the loads for one block of rows, given its raw tiles
    (``_load_rows``): x's own norm (X_NORM) -> residual add or gate -> norm -> weight -> gate
    -> quantize, and every store. The ``r`` tiles are the residual's (HAS_RES) or the
    gate's (GATE)."""
    rmask = _row_mask(rows, T, EVEN_ROWS)
    rows_off = _row_offsets(rows, OFFSETS_64)
    X_DT: tl.constexpr = x_ptr.dtype.element_ty
    C1: tl.constexpr = NG0 * G0
    C2: tl.constexpr = C1 + NG1 * G1
    # a split row of one row per program: its statistics are folded (_fold; a reshape that
    # may reorder elements keeps them in their row only when there is one row)
    FOLD: tl.constexpr = NG1 > 0 and rows.shape[0] == 1
    WF: tl.constexpr = NG2 * G2 if NG2 > 0 else NG1 * G1  # the narrowest tile
    ONE_ROW: tl.constexpr = rows.shape[0] == 1

    # The weight read first, before any reduction, in flight together with x: a small grid
    # (decode) then waits for one memory round trip, not a second one after the reduction.
    # The static scale as well: its load would otherwise follow the reduction too.
    STATIC: tl.constexpr = QUANT == 1 or QUANT == 4
    s_in = offset  # placeholder (never read) unless EARLY_LOADS loads the static scale here
    if STATIC and EARLY_LOADS:
        s_in = tl.load(scale_in_ptr)
    zero = _unfoldable_zero(T, s_in, STATIC and EARLY_LOADS)
    w0, w1, w2 = x0, x0, x0  # without a weight: x itself (x ^ (x & zero) waits for zero)
    if HAS_WEIGHT and EARLY_LOADS:
        w0, w1, w2 = _weights(w_ptr, stride_w, H, NG0, G0, NG1, G1, NG2, G2, ONE_ROW, EVEN_COLS)
    if EARLY_LOADS and (HAS_WEIGHT or STATIC):  # x's first use waits for them
        x0 = _after(x0, w0, zero, PRECISE)
        if NG1 > 0:
            x1 = _after(x1, w1 if HAS_WEIGHT else x1, zero, PRECISE)
        if NG2 > 0:
            x2 = _after(x2, w2 if HAS_WEIGHT else x2, zero, PRECISE)
    if GATE == 1 and EARLY_LOADS:  # the gate, used after the norm, read with x too: ptxas
        # sinks a split row's gate loads below the reduction (offline SASS, 3584 and 5376)
        x0 = _after(x0, r0, zero, PRECISE)
        if NG1 > 0:
            x1 = _after(x1, r1, zero, PRECISE)
        if NG2 > 0:
            x2 = _after(x2, r2, zero, PRECISE)
    if X_NORM:  # rms_norm_add_rms_norm: x is normalized before the residual add
        xw0, xw1, xw2 = _weights(xw_ptr, stride_xw, H, NG0, G0, NG1, G1, NG2, G2, ONE_ROW,
                                 EVEN_COLS)
        x0, x1, x2 = _x_normed(x0, x1, x2, xw0, xw1, xw2, H, x_eps, x_offset,
                               NG0, G0, NG1, G1, NG2, G2, X_DT, FOLD, WF, X_W_OFFSET,
                               EVEN_COLS, PRECISE)
    gi0, cols0, cm0 = _tile(0, NG0, G0, H, EVEN_COLS)
    m0 = _tile_mask(rmask, cm0)
    v0 = _add_res(x0, r0, res_out_ptr, rows_off, cols0, m0, H, X_DT, HAS_RES, PRECISE,
                  X_NORM)
    v1, cols1, v2, cols2 = v0, cols0, v0, cols0  # placeholders of absent tiles (never read)
    if NG1 > 0:
        gi1, cols1, cm1 = _tile(C1, NG1, G1, H, EVEN_COLS)
        m1 = _tile_mask(rmask, cm1)
        v1 = _add_res(x1, r1, res_out_ptr, rows_off, cols1, m1, H, X_DT, HAS_RES, PRECISE,
                      X_NORM)
    if NG2 > 0:
        gi2, cols2, cm2 = _tile(C2, NG2, G2, H, EVEN_COLS)
        m2 = _tile_mask(rmask, cm2)
        v2 = _add_res(x2, r2, res_out_ptr, rows_off, cols2, m2, H, X_DT, HAS_RES, PRECISE,
                      X_NORM)

    if DO_NORM:
        v0 = _gate_input(v0, r0, GATE, PRECISE)
        if NG1 > 0:
            v1 = _gate_input(v1, r1, GATE, PRECISE)
        if NG2 > 0:
            v2 = _gate_input(v2, r2, GATE, PRECISE)
        if NORM_GROUPED:  # each group of a tile is normalized on its own (V: the group size)
            rs0 = _group_rstd(v0, cols0, gi0, 0, G0, H, V, eps, EVEN_COLS, PRECISE)
            if NG1 > 0:
                rs1 = _group_rstd(v1, cols1, gi1, C1, G1, H, V, eps, EVEN_COLS, PRECISE)
            if NG2 > 0:
                rs2 = _group_rstd(v2, cols2, gi2, C2, G2, H, V, eps, EVEN_COLS, PRECISE)
        else:
            ss = _row_sumsq(v0, v1, v2, cols0, cols1, cols2, V, NG1, NG2, HAS_VSIZE, FOLD, WF)
            rs0 = _rstd(ss, V, eps, PRECISE)[:, None, None]
            rs1 = rs0
            rs2 = rs0
        LATE_W: tl.constexpr = HAS_WEIGHT and not EARLY_LOADS
        if LATE_W:  # each tile's weight just before its use: fewer live registers
            w0 = _load_weight(w_ptr, cols0, cm0, stride_w, ONE_ROW)
        v0 = _normed(v0, r0, rs0, w0, out_ptr, rows_off, cols0, m0, H, offset,
                     X_DT, HAS_WEIGHT, W_OFFSET, STORE_OUT, PRECISE, GATE, PROMOTE)
        if NG1 > 0:
            if LATE_W:
                w1 = _load_weight(w_ptr, cols1, cm1, stride_w, ONE_ROW)
            v1 = _normed(v1, r1, rs1, w1, out_ptr, rows_off, cols1, m1, H, offset,
                         X_DT, HAS_WEIGHT, W_OFFSET, STORE_OUT, PRECISE, GATE, PROMOTE)
        if NG2 > 0:
            if LATE_W:
                w2 = _load_weight(w_ptr, cols2, cm2, stride_w, ONE_ROW)
            v2 = _normed(v2, r2, rs2, w2, out_ptr, rows_off, cols2, m2, H, offset,
                         X_DT, HAS_WEIGHT, W_OFFSET, STORE_OUT, PRECISE, GATE, PROMOTE)
        if QUANT != 0 and not PROMOTE:  # the quantized value, a value of x.dtype
            v0 = _rewiden(v0, X_DT, PRECISE)
            if NG1 > 0:
                v1 = _rewiden(v1, X_DT, PRECISE)
            if NG2 > 0:
                v2 = _rewiden(v2, X_DT, PRECISE)

    if QUANT == 1 or QUANT == 4:  # static scale (a scalar)
        if EARLY_LOADS:
            s = s_in
        else:
            s = tl.load(scale_in_ptr)
        # FP8 SCALE_FORM 1 / 2 multiply (by reciprocal(s) / by s): the exact branch below
        if SCALE_FORM == 1:
            rs_exact = _recip(s)
        else:
            rs_exact = s
        # the fast division needs a normal scale with a normal reciprocal
        fast = (s >= 1.1754943508222875e-38) & (s <= 8.507059173023462e37)
        fast = fast & (SCALE_FORM == 0)
        if fast:
            rs = _recip(s)
            _quantize(v0, m0, q_ptr, rows_off, cols0, H, s, rs, s, aux_in_ptr, QUANT, HAS_AUX,
                      PRECISE, PRECISE, 0)
            if NG1 > 0:
                _quantize(v1, m1, q_ptr, rows_off, cols1, H, s, rs, s, aux_in_ptr, QUANT, HAS_AUX,
                          PRECISE, PRECISE, 0)
            if NG2 > 0:
                _quantize(v2, m2, q_ptr, rows_off, cols2, H, s, rs, s, aux_in_ptr, QUANT, HAS_AUX,
                          PRECISE, PRECISE, 0)
        else:
            _quantize(v0, m0, q_ptr, rows_off, cols0, H, s, rs_exact, s, aux_in_ptr, QUANT,
                      HAS_AUX, PRECISE, False, SCALE_FORM)
            if NG1 > 0:
                _quantize(v1, m1, q_ptr, rows_off, cols1, H, s, rs_exact, s, aux_in_ptr, QUANT,
                          HAS_AUX, PRECISE, False, SCALE_FORM)
            if NG2 > 0:
                _quantize(v2, m2, q_ptr, rows_off, cols2, H, s, rs_exact, s, aux_in_ptr, QUANT,
                          HAS_AUX, PRECISE, False, SCALE_FORM)
    elif QUANT == 3:  # fp8 per group: groups never straddle tiles
        _group_tile(v0, m0, rmask, rows_off, gi0, cols0, 0, G0, H, q_ptr, s_ptr, aux_in_ptr,
                    stride_st, stride_sg, UE8M0, PRECISE, SCALAR_RECIP, FP8_RECIP, X_DT,
                    SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT)
        if NG1 > 0:
            _group_tile(v1, m1, rmask, rows_off, gi1, cols1, C1, G1, H, q_ptr, s_ptr, aux_in_ptr,
                        stride_st, stride_sg, UE8M0, PRECISE, SCALAR_RECIP, FP8_RECIP, X_DT,
                    SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT)
        if NG2 > 0:
            _group_tile(v2, m2, rmask, rows_off, gi2, cols2, C2, G2, H, q_ptr, s_ptr, aux_in_ptr,
                        stride_st, stride_sg, UE8M0, PRECISE, SCALAR_RECIP, FP8_RECIP, X_DT,
                    SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT)
    elif QUANT == 7:  # MXFP8: blocks never straddle tiles
        _mx_tile(v0, m0, rmask, rows_off, gi0, cols0, 0, G0, H, q_ptr, s_ptr, stride_st,
                 stride_sg, MX_SCALE, PRECISE, SCALAR_RECIP, FP8_RECIP)
        if NG1 > 0:
            _mx_tile(v1, m1, rmask, rows_off, gi1, cols1, C1, G1, H, q_ptr, s_ptr, stride_st,
                     stride_sg, MX_SCALE, PRECISE, SCALAR_RECIP, FP8_RECIP)
        if NG2 > 0:
            _mx_tile(v2, m2, rmask, rows_off, gi2, cols2, C2, G2, H, q_ptr, s_ptr, stride_st,
                     stride_sg, MX_SCALE, PRECISE, SCALAR_RECIP, FP8_RECIP)
    elif QUANT != 0:  # dynamic per token: statistics over all tiles
        if FOLD:  # the tiles' partials, then one reduction across warps
            s1, s2 = _folded_stats(v0, m0, WF, QUANT, PRECISE)
            t1, t2 = _folded_stats(v1, m1, WF, QUANT, PRECISE)
            s1, s2 = _merge(s1, s2, t1, t2, QUANT)
            if NG2 > 0:
                t1, t2 = _folded_stats(v2, m2, WF, QUANT, PRECISE)
                s1, s2 = _merge(s1, s2, t1, t2, QUANT)
            s1 = _amax(s1, 1, PRECISE)[:, None]
            if QUANT == 6:
                s2 = _amin(s2, 1, PRECISE)[:, None]
            else:
                s2 = s1
        else:
            s1, s2 = _token_stats(v0, m0, NG0, QUANT, PRECISE)
            if NG1 > 0:
                t1, t2 = _token_stats(v1, m1, NG1, QUANT, PRECISE)
                s1, s2 = _merge(s1, s2, t1, t2, QUANT)
            if NG2 > 0:
                t1, t2 = _token_stats(v2, m2, NG2, QUANT, PRECISE)
                s1, s2 = _merge(s1, s2, t1, t2, QUANT)
        scale, rscale, azp = _dyn_scale(s1, s2, aux_in_ptr, QUANT, HAS_AUX, UE8M0, PRECISE,
                                        SCALAR_RECIP, FP8_RECIP, INT8_RECIP, U8_RECIP, X_DT,
                                        SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT)
        smask = rmask[:, None]  # [BLOCK_M, 1]
        soffs = rows_off[:, None] * stride_st
        tl.store(s_ptr + soffs, scale, mask=smask)
        if QUANT == 6:
            tl.store(azp_ptr + soffs, azp.to(tl.int32), mask=smask)
        scale, rscale, azp = scale[:, :, None], rscale[:, :, None], azp[:, :, None]
        if q_ptr is not None:  # None: the scales only (per-tensor FP8's first pass)
            _quantize(v0, m0, q_ptr, rows_off, cols0, H, scale, rscale, azp, aux_in_ptr, QUANT,
                      HAS_AUX, PRECISE, PRECISE, SCALE_FORM)
            if NG1 > 0:
                _quantize(v1, m1, q_ptr, rows_off, cols1, H, scale, rscale, azp, aux_in_ptr, QUANT,
                          HAS_AUX, PRECISE, PRECISE, SCALE_FORM)
            if NG2 > 0:
                _quantize(v2, m2, q_ptr, rows_off, cols2, H, scale, rscale, azp, aux_in_ptr, QUANT,
                          HAS_AUX, PRECISE, PRECISE, SCALE_FORM)


@triton.jit(do_not_specialize=["T", "stride_st", "stride_sg"])
def norm_quant_kernel(
    x_ptr, r_ptr, w_ptr,  # inputs: x [T, H], residual or gate [T, H], weight [H]
    out_ptr, res_out_ptr,  # outputs [T, H] (contiguous)
    q_ptr, s_ptr, azp_ptr,  # quantized [T, H] (contiguous), scales, int32 zero points
    scale_in_ptr, aux_in_ptr,  # static scale; scale_ub (fp8 dynamic) or azp (int8 static)
    T, H,
    stride_x, stride_r, stride_w,
    stride_st, stride_sg,  # scale strides: per token, per group
    eps, offset, V,  # V: number of columns in the variance (variance_size)
    xw_ptr, stride_xw, x_eps, x_offset,  # rms_norm_add_rms_norm: the norm of x before the add
    BLOCK_M: tl.constexpr,
    NG0: tl.constexpr, G0: tl.constexpr,  # tile 0: columns [0, NG0 * G0)
    NG1: tl.constexpr, G1: tl.constexpr,  # tile 1 (NG1 = 0: none): the next NG1 * G1
    NG2: tl.constexpr, G2: tl.constexpr,  # tile 2 (NG2 = 0: none), masked at H
    HAS_RES: tl.constexpr, DO_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    W_OFFSET: tl.constexpr,  # weight_offset != 0: fp32 (w + offset)
    HAS_VSIZE: tl.constexpr,  # variance over the first V columns only
    STORE_OUT: tl.constexpr, QUANT: tl.constexpr, HAS_AUX: tl.constexpr,
    UE8M0: tl.constexpr, PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr,
    FP8_RECIP: tl.constexpr, INT8_RECIP: tl.constexpr, U8_RECIP: tl.constexpr,
    PERSISTENT: tl.constexpr = False,  # loop over row blocks, prefetching the next one
    EVEN_ROWS: tl.constexpr = False,  # every row block full (T % BLOCK_M == 0; not PERSISTENT)
    EVEN_COLS: tl.constexpr = False,  # the column tiles cover exactly H
    MX_SCALE: tl.constexpr = 0,  # MXFP8: the scale mode (schemes/mxfp8.SCALING_MODES)
    # dynamic FP8 scale arithmetic (ops/quant.py fp8_kernel_scale; KernelQuant's fields)
    SCALE_FORM: tl.constexpr = 0, MIN_AT: tl.constexpr = 1,
    MIN_VALUE: tl.constexpr = 1.0 / (448.0 * 512.0), INV_MIN: tl.constexpr = 0.0,
    SCALE_X_DT: tl.constexpr = False,
    # the gated norm (ops/gated.py): 0 none, 1 silu(gate) after the norm, 2 before it; its
    # norm per group of G (V = G); its output float32 (16-bit x, weight of another dtype)
    GATE: tl.constexpr = 0, NORM_GROUPED: tl.constexpr = False, PROMOTE: tl.constexpr = False,
    # x normalized (weight xw, fp32 ``xw + x_offset`` with X_W_OFFSET) before the residual add
    X_NORM: tl.constexpr = False, X_W_OFFSET: tl.constexpr = False,
    OFFSETS_64: tl.constexpr = True,  # int64 row offsets (an offset may pass 2**31)
    EARLY_LOADS: tl.constexpr = True,  # the weight read with x, before the reduction (_after)
):
    # Inductor passes Python floats as fp64 (eager Triton: fp32): fp64 would make rstd and
    # every product with it fp64 (slower, and not the reference's fp32 arithmetic). tl.cast,
    # not .to: Inductor's mutation analysis and the interpreter hand in Python floats.
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    x_eps = tl.cast(x_eps, tl.float32)
    x_offset = tl.cast(x_offset, tl.float32)
    HAS_R: tl.constexpr = HAS_RES or GATE != 0  # a second [T, H] input
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + lanes
    x0, r0, x1, r1, x2, r2 = _load_rows(x_ptr, r_ptr, rows, T, H, stride_x, stride_r,
                                        NG0, G0, NG1, G1, NG2, G2, HAS_R, EVEN_ROWS, EVEN_COLS,
                                        OFFSETS_64)
    if PERSISTENT:
        # Row blocks pid, pid + nprog, ...: the next block's loads are issued before this
        # block's math and stores (their values are first used in the next iteration),
        # so its reads are in flight meanwhile. The last prefetch is masked (rows >= T).
        # (A while loop: the interpreter cannot take tensors as range() bounds.)
        nprog = tl.num_programs(0)
        nblk = tl.cdiv(T, BLOCK_M)
        blk = pid
        while blk < nblk:
            cur = blk * BLOCK_M + lanes
            n0, nr0, n1, nr1, n2, nr2 = _load_rows(
                x_ptr, r_ptr, cur + nprog * BLOCK_M, T, H, stride_x, stride_r,
                NG0, G0, NG1, G1, NG2, G2, HAS_R, EVEN_ROWS, EVEN_COLS, OFFSETS_64)
            _process(x0, r0, x1, r1, x2, r2, cur, T, H, x_ptr, w_ptr, out_ptr, res_out_ptr,
                     q_ptr, s_ptr, azp_ptr, scale_in_ptr, aux_in_ptr, stride_w, stride_st,
                     stride_sg, eps, offset, V, NG0, G0, NG1, G1, NG2, G2, HAS_RES, DO_NORM,
                     HAS_WEIGHT, W_OFFSET, HAS_VSIZE, STORE_OUT, QUANT, HAS_AUX, UE8M0,
                     PRECISE, SCALAR_RECIP, FP8_RECIP, INT8_RECIP, U8_RECIP, EVEN_ROWS,
                     EVEN_COLS, MX_SCALE, SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT,
                     GATE, NORM_GROUPED, PROMOTE, xw_ptr, stride_xw, x_eps, x_offset, X_NORM,
                     X_W_OFFSET, OFFSETS_64, EARLY_LOADS)
            x0, r0, x1, r1, x2, r2 = n0, nr0, n1, nr1, n2, nr2
            blk += nprog
    else:
        _process(x0, r0, x1, r1, x2, r2, rows, T, H, x_ptr, w_ptr, out_ptr, res_out_ptr,
                 q_ptr, s_ptr, azp_ptr, scale_in_ptr, aux_in_ptr, stride_w, stride_st,
                 stride_sg, eps, offset, V, NG0, G0, NG1, G1, NG2, G2, HAS_RES, DO_NORM,
                 HAS_WEIGHT, W_OFFSET, HAS_VSIZE, STORE_OUT, QUANT, HAS_AUX, UE8M0,
                 PRECISE, SCALAR_RECIP, FP8_RECIP, INT8_RECIP, U8_RECIP, EVEN_ROWS,
                 EVEN_COLS, MX_SCALE, SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT,
                 GATE, NORM_GROUPED, PROMOTE, xw_ptr, stride_xw, x_eps, x_offset, X_NORM,
                 X_W_OFFSET, OFFSETS_64, EARLY_LOADS)
