"""Triton kernels of the rms_norm backward (imported only when triton is).

``rms_norm_backward_kernel``: persistent programs, each looping over blocks of ``BLOCK_M``
rows (block ``pid``, ``pid + n_programs``, ...). Per row, in fp32, with the row in registers:
``rstd`` is recomputed from x (the forward saves nothing but x),
``dx = rstd * (g * w) - x_v * rstd^3 * sum(g * w * x) / V`` where ``x_v`` is x on the first
``V`` columns (``variance_size``) and 0 after, and ``w = weight + offset`` in fp32 (1 without
a weight). ``dweight`` partial sums ``sum_rows g * (x * rstd)`` stay in fp32 registers for all
the rows a program handles and are written once per program to ``[n_programs, H]``;
``dweight_reduce_kernel`` sums those columns in fp32 and rounds once to the weight's dtype;
a launch of one program (``DW_DIRECT``: decode, per-head rows of a few tokens) rounds and
stores its sums itself, the same bits in one launch.
With ``grad_residual`` (fused add), dx rounded to x.dtype gets it added as torch adds two
tensors of x.dtype. This is ``rms_norm_backward_ref``'s arithmetic, with its sums taken in
another order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import _round_to

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice


@triton.jit
def _row_block(block, acc, w, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H, stride_g, stride_x, stride_gr,
               eps, V, cols, cmask, in_var, BLOCK_M: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_VSIZE: tl.constexpr, HAS_GRES: tl.constexpr, PRECISE: tl.constexpr):
    """dx of rows ``[block * BLOCK_M, ...)``; returns ``acc`` plus their dweight terms."""
    X_DT: tl.constexpr = x_ptr.dtype.element_ty
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    sq = x * x
    if HAS_VSIZE:
        sq = tl.where(in_var[None, :], sq, 0.0)
    var = tl.sum(sq, axis=1) / V
    if PRECISE:
        rstd = libdevice.rsqrt(var + eps)
    else:
        rstd = tl.math.rsqrt(var + eps)
    # rows past T: 0 (with eps = 0 their rstd is inf, and 0 * inf would poison dweight)
    rstd = tl.where(rmask, rstd, 0.0)
    if HAS_WEIGHT:
        acc += g * (x * rstd[:, None])
        g = g * w[None, :]
    coef = tl.sum(g * x, axis=1) * (rstd * rstd * rstd) / V
    xv = x
    if HAS_VSIZE:
        xv = tl.where(in_var[None, :], x, 0.0)
    dx = g * rstd[:, None] - xv * coef[:, None]
    dx = _round_to(dx, X_DT, PRECISE)  # exact store: the interpreter's bf16 cast truncates
    if HAS_GRES:  # + grad of residual_out in x.dtype: torch's add (fp32 sum, one rounding)
        gr = tl.load(gr_ptr + rows64[:, None] * stride_gr + cols[None, :], mask=mask, other=0.0,
                     eviction_policy="evict_first")
        dx = _round_to(dx + gr.to(tl.float32), X_DT, PRECISE)
    tl.store(dx_ptr + rows64[:, None] * H + cols[None, :], dx, mask=mask)
    return acc


@triton.jit(do_not_specialize=["T"])
def rms_norm_backward_kernel(
    g_ptr, x_ptr, w_ptr,  # inputs: grad [T, H], x [T, H] (unit column stride), weight [H]
    gr_ptr,  # grad_residual [T, H] (fused add: added to dx)
    dx_ptr, dw_ptr,  # outputs: dx [T, H] contiguous, fp32 dweight partials [n_programs, H]
    T, H, stride_g, stride_x, stride_w, stride_gr,
    eps, offset, V,  # V: number of columns in the variance (variance_size)
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_VSIZE: tl.constexpr, HAS_GRES: tl.constexpr,
    PRECISE: tl.constexpr, NUM_STAGES: tl.constexpr,
    DW_DIRECT: tl.constexpr = False,  # one program: dw_ptr is dweight itself, rounded here
):
    if PRECISE:  # compiled: Python floats may arrive as fp64; the reference works in fp32
        # tl.cast, not .to(): Inductor's mutation analysis hands the floats in as Python floats,
        # and a failed analysis makes it copy every input (H200 run 17: 144 vs 120 us)
        eps = tl.cast(eps, tl.float32)
        offset = tl.cast(offset, tl.float32)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    in_var = cols < V
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    w = tl.full([BLOCK_H], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols * stride_w, mask=cmask, other=0.0).to(tl.float32) + offset
    n_blocks = tl.cdiv(T, BLOCK_M)
    if PRECISE:  # NUM_STAGES > 1: the next blocks' loads are issued while this one computes
        for block in tl.range(pid, n_blocks, n_programs, num_stages=NUM_STAGES):
            acc = _row_block(block, acc, w, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H, stride_g, stride_x,
                             stride_gr, eps, V, cols, cmask, in_var, BLOCK_M, HAS_WEIGHT,
                             HAS_VSIZE, HAS_GRES, PRECISE)
    else:  # the interpreter cannot take a runtime bound in range() (numpy >= 2): same loop
        block = pid
        while block < n_blocks:
            acc = _row_block(block, acc, w, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H, stride_g, stride_x,
                             stride_gr, eps, V, cols, cmask, in_var, BLOCK_M, HAS_WEIGHT,
                             HAS_VSIZE, HAS_GRES, PRECISE)
            block += n_programs
    if HAS_WEIGHT:
        dw = tl.sum(acc, axis=0)
        if DW_DIRECT:  # the column sums of the only program: what the reduce would round
            tl.store(dw_ptr + cols, _round_to(dw, dw_ptr.dtype.element_ty, PRECISE), mask=cmask)
        else:
            tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=cmask)


@triton.jit
def _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P: tl.constexpr):
    rows = p0 + tl.arange(0, BLOCK_P)
    mask = (rows < P)[:, None] & cmask[None, :]
    return acc + tl.load(p_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)


@triton.jit
def dweight_reduce_kernel(p_ptr, dw_ptr, P, H, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                          PRECISE: tl.constexpr, NUM_STAGES: tl.constexpr = 1):
    """``dw[c] = sum_p partials[p, c]`` in fp32, rounded once to dw's dtype (NUM_STAGES > 1:
    the next steps' loads are issued while one is added; the same order, the same bits)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < H
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if PRECISE:
        for p0 in tl.range(0, P, BLOCK_P, num_stages=NUM_STAGES):
            acc = _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P)
    else:  # the interpreter: a while loop (see rms_norm_backward_kernel)
        p0 = 0
        while p0 < P:
            acc = _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P)
            p0 += BLOCK_P
    dw = _round_to(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty, PRECISE)
    tl.store(dw_ptr + cols, dw, mask=cmask)
