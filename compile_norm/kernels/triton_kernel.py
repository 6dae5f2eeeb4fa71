"""One row-wise Triton kernel for the whole RMSNorm family (imported only when triton is).

``norm_quant_kernel`` does, for ``BLOCK_M`` rows per program, in one launch:
residual add -> RMSNorm (fp32 statistics) -> weight (16-bit "round then multiply", or Gemma's
fp32 ``w + offset``) -> output rounded to x.dtype -> quantization of that rounded value.
Each stage is switched by a ``tl.constexpr`` so every op compiles to a kernel with only its
own work. The row is loaded once and stays in registers.

The tile is 3-D ``[BLOCK_M, NG, G]``: ``NG`` groups of ``G`` columns. Per-group FP8 uses the
real group size; every other mode uses ``NG = 1, G = BLOCK_N`` so the same code gives per-row
statistics, and no reshape (layout shuffle) is ever needed.

Numerics copy the reference (compile_norm/ops/norm.py, quant.py) as torch executes it:
``a / b`` of two tensors is IEEE division (``div_rn``, not Triton's approximate ``/``);
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

# Quantization modes (QUANT constexpr).
Q_NONE = 0
Q_FP8_STATIC = 1
Q_FP8_DYNAMIC = 2
Q_FP8_GROUP = 3
Q_INT8_STATIC = 4
Q_INT8_DYNAMIC = 5
Q_INT8_DYNAMIC_ASYM = 6


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
def _div(a, b):
    """IEEE ``a / b`` (torch's tensor division), broadcasting b."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


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
    v = tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    if PRECISE:
        q = v.to(tl.float8e4nv)
    else:
        # The interpreter's fp8 cast rounds half up without carry: round to the e4m3 grid
        # here (step 2**(e - 3), subnormal step 2**-9), so its cast is exact.
        e = ((tl.abs(v).to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        e = tl.maximum(e, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
        r = _rint(v * inv, PRECISE) * step
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


@triton.jit(do_not_specialize=["T", "stride_st", "stride_sg"])
def norm_quant_kernel(
    x_ptr, r_ptr, w_ptr,  # inputs: x [T, H], residual [T, H], weight [H]
    out_ptr, res_out_ptr,  # outputs [T, H] (contiguous)
    q_ptr, s_ptr, azp_ptr,  # quantized [T, H] (contiguous), scales, int32 zero points
    scale_in_ptr, aux_in_ptr,  # static scale; scale_ub (fp8 dynamic) or azp (int8 static)
    T, H,
    stride_x, stride_r, stride_w,
    stride_st, stride_sg,  # scale strides: per token, per group
    eps, offset, V,  # V: number of columns in the variance (variance_size)
    BLOCK_M: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
    HAS_RES: tl.constexpr, DO_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    W_OFFSET: tl.constexpr,  # weight_offset != 0: fp32 (w + offset)
    HAS_VSIZE: tl.constexpr,  # variance over the first V columns only
    STORE_OUT: tl.constexpr, QUANT: tl.constexpr, HAS_AUX: tl.constexpr,
    UE8M0: tl.constexpr, PRECISE: tl.constexpr, SCALAR_RECIP: tl.constexpr,
    FP8_RECIP: tl.constexpr, INT8_RECIP: tl.constexpr, U8_RECIP: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    gidx = tl.arange(0, NG)
    cols = gidx[:, None] * G + tl.arange(0, G)[None, :]  # [NG, G]
    cmask = cols < H
    mask = rmask[:, None, None] & cmask[None, :, :]
    row3 = rows64[:, None, None]
    col3 = cols[None, :, :]

    x = tl.load(x_ptr + row3 * stride_x + col3, mask=mask, other=0.0,
                eviction_policy="evict_first")
    X_DT: tl.constexpr = x_ptr.dtype.element_ty
    if HAS_RES:
        r = tl.load(r_ptr + row3 * stride_r + col3, mask=mask, other=0.0,
                    eviction_policy="evict_first")
        # x + residual in x.dtype: exact fp32 sum, rounded once (as torch does).
        xf = _round_to(x.to(tl.float32) + r.to(tl.float32), X_DT, PRECISE)
        tl.store(res_out_ptr + row3 * H + col3, xf, mask=mask)
    else:
        xf = x.to(tl.float32)

    if DO_NORM:
        sq = xf * xf
        if HAS_VSIZE:
            sq = tl.where(col3 < V, sq, 0.0)
        var = tl.sum(tl.sum(sq, axis=2), axis=1) / V
        if PRECISE:
            rstd = libdevice.rsqrt(var + eps)
        else:
            rstd = tl.math.rsqrt(var + eps)
        y = xf * rstd[:, None, None]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols * stride_w, mask=cmask, other=0.0,
                        eviction_policy="evict_last")
            if W_OFFSET:
                y = y * (w.to(tl.float32) + offset)[None, :, :]
            else:
                # y.to(w.dtype) * w in w.dtype: the fp32 product of two 16-bit values is
                # exact, so rounding it once equals torch's 16-bit multiply.
                W_DT: tl.constexpr = w_ptr.dtype.element_ty
                y = _round_to(y, W_DT, PRECISE) * w.to(tl.float32)[None, :, :]
                y = _round_to(y, W_DT, PRECISE)
        v = _round_to(y, X_DT, PRECISE)  # the output as the model sees it, in fp32
        if STORE_OUT:
            tl.store(out_ptr + row3 * H + col3, v, mask=mask)
    else:
        v = xf

    if QUANT != 0:
        qoffs = q_ptr + row3 * H + col3
        smask = rmask[:, None] & (gidx * G < H)[None, :]  # [BLOCK_M, NG]
        soffs = s_ptr + rows64[:, None] * stride_st + gidx[None, :] * stride_sg

    if QUANT == 1:  # fp8 static
        s = tl.load(scale_in_ptr)
        q = _sat_fp8(_div(v, s), PRECISE)
        tl.store(qoffs, q, mask=mask)
    elif QUANT == 2 or QUANT == 3:  # fp8 dynamic per token / per group
        a = tl.where(mask, tl.abs(v), 0.0)
        amax = _amax(a, 2, PRECISE)  # [BLOCK_M, NG]
        if HAS_AUX:
            ub = tl.load(aux_in_ptr)
            amax = tl.minimum(amax, ub, propagate_nan=tl.PropagateNan.ALL)
        scale = _div_scalar(amax, 448.0, FP8_RECIP, SCALAR_RECIP)
        scale = tl.maximum(scale, 1.0 / (448.0 * 512.0), propagate_nan=tl.PropagateNan.ALL)
        if UE8M0:
            if PRECISE:
                scale = libdevice.exp2(libdevice.ceil(libdevice.log2(scale)))
            else:
                scale = tl.math.exp2(tl.math.ceil(tl.math.log2(scale)))
        q = _sat_fp8(_div(v, scale[:, :, None]), PRECISE)
        tl.store(qoffs, q, mask=mask)
        tl.store(soffs, scale, mask=smask)
    elif QUANT == 4:  # int8 static
        s = tl.load(scale_in_ptr)
        t = _rint(_div(v, s), PRECISE)
        if HAS_AUX:
            t = t + tl.load(aux_in_ptr).to(tl.float32)
        tl.store(qoffs, _sat_int8(t), mask=mask)
    elif QUANT == 5:  # int8 dynamic symmetric
        a = tl.where(mask, tl.abs(v), 0.0)
        amax = _amax(a, 2, PRECISE)
        scale = _div_scalar(amax, 127.0, INT8_RECIP, SCALAR_RECIP)
        scale = tl.maximum(scale, 1e-10, propagate_nan=tl.PropagateNan.ALL)
        t = _rint(_div(v, scale[:, :, None]), PRECISE)
        tl.store(qoffs, _sat_int8(t), mask=mask)
        tl.store(soffs, scale, mask=smask)
    elif QUANT == 6:  # int8 dynamic asymmetric
        vmax = _amax(tl.where(mask, v, float("-inf")), 2, PRECISE)
        vmin = _amin(tl.where(mask, v, float("inf")), 2, PRECISE)
        scale = _div_scalar(vmax - vmin, 255.0, U8_RECIP, SCALAR_RECIP)
        scale = tl.maximum(scale, 1e-10, propagate_nan=tl.PropagateNan.ALL)
        azp = _rint(-128.0 - _div(vmin, scale), PRECISE)
        azp = tl.where(azp != azp, 0.0, azp)
        t = _rint(_div(v, scale[:, :, None]), PRECISE)
        tl.store(qoffs, _sat_int8(t + azp[:, :, None]), mask=mask)
        tl.store(soffs, scale, mask=smask)
        tl.store(azp_ptr + rows64[:, None] * stride_st + gidx[None, :] * stride_sg,
                 azp.to(tl.int32), mask=smask)
