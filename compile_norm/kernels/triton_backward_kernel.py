"""Triton kernels of the rms_norm backward (imported only when triton is).

``rms_norm_backward_kernel``: persistent programs, each looping over blocks of ``BLOCK_M``
rows (block ``pid``, ``pid + n_programs``, ...). Per row, in fp32, with the row in registers
as up to three power-of-two column tiles (5376 = 4096 + 1024 + 256, as the forward kernel
splits it, instead of one tile padded to 8192):
``rstd`` is recomputed from x (the forward saves nothing but x),
``dx = rstd * (g * w) - x_v * rstd^3 * sum(g * w * x) / V`` where ``x_v`` is x on the first
``V`` columns (``variance_size``) and 0 after, and ``w = weight + offset`` in fp32 (1 without
a weight). ``dweight`` partial sums ``sum_rows g * (x * rstd)`` stay in fp32 registers for all
the rows a program handles and are written once per program to ``[n_programs, H]``;
``dweight_reduce_kernel`` sums those columns in fp32 and rounds once to the weight's dtype.
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
def _load_tile(ptr, rows64, stride, cols, mask):
    return tl.load(ptr + rows64[:, None] * stride + cols[None, :], mask=mask, other=0.0,
                   eviction_policy="evict_first").to(tl.float32)


@triton.jit
def _tile_sums(x, g, w, cols, V, HAS_WEIGHT: tl.constexpr, HAS_VSIZE: tl.constexpr):
    """Per row of one tile: (sum x^2 over the variance columns, sum g * w * x)."""
    sq = x * x
    if HAS_VSIZE:
        sq = tl.where(cols[None, :] < V, sq, 0.0)
    if HAS_WEIGHT:
        g = g * w[None, :]
    return tl.sum(sq, axis=1), tl.sum(g * x, axis=1)


@triton.jit
def _tile_dx(x, g, w, acc, rstd, coef, rows64, cols, mask, gr_ptr, dx_ptr, H, stride_gr, V,
             X_DT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_VSIZE: tl.constexpr,
             HAS_GRES: tl.constexpr, PRECISE: tl.constexpr):
    """Stores one tile's dx; returns ``acc`` plus its dweight terms."""
    if HAS_WEIGHT:
        acc += g * (x * rstd[:, None])
        g = g * w[None, :]
    xv = x
    if HAS_VSIZE:
        xv = tl.where(cols[None, :] < V, x, 0.0)
    dx = g * rstd[:, None] - xv * coef[:, None]
    dx = _round_to(dx, X_DT, PRECISE)  # exact store: the interpreter's bf16 cast truncates
    if HAS_GRES:  # + grad of residual_out in x.dtype: torch's add (fp32 sum, one rounding)
        gr = tl.load(gr_ptr + rows64[:, None] * stride_gr + cols[None, :], mask=mask, other=0.0,
                     eviction_policy="evict_first")
        dx = _round_to(dx + gr.to(tl.float32), X_DT, PRECISE)
    tl.store(dx_ptr + rows64[:, None] * H + cols[None, :], dx, mask=mask)
    return acc


@triton.jit
def _row_block(block, acc0, acc1, acc2, w0, w1, w2, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H,
               stride_g, stride_x, stride_gr, eps, V, BLOCK_M: tl.constexpr, W0: tl.constexpr,
               W1: tl.constexpr, W2: tl.constexpr, NT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_VSIZE: tl.constexpr, HAS_GRES: tl.constexpr, PRECISE: tl.constexpr):
    """dx of rows ``[block * BLOCK_M, ...)``, the row in ``NT`` column tiles; returns the
    accumulators plus their dweight terms."""
    X_DT: tl.constexpr = x_ptr.dtype.element_ty
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    c0 = tl.arange(0, W0)
    m0 = rmask[:, None] & (c0 < H)[None, :]
    x0 = _load_tile(x_ptr, rows64, stride_x, c0, m0)
    g0 = _load_tile(g_ptr, rows64, stride_g, c0, m0)
    ss, gx = _tile_sums(x0, g0, w0, c0, V, HAS_WEIGHT, HAS_VSIZE)
    if NT > 1:
        c1 = W0 + tl.arange(0, W1)
        m1 = rmask[:, None] & (c1 < H)[None, :]
        x1 = _load_tile(x_ptr, rows64, stride_x, c1, m1)
        g1 = _load_tile(g_ptr, rows64, stride_g, c1, m1)
        ss1, gx1 = _tile_sums(x1, g1, w1, c1, V, HAS_WEIGHT, HAS_VSIZE)
        ss += ss1
        gx += gx1
    if NT > 2:
        c2 = W0 + W1 + tl.arange(0, W2)
        m2 = rmask[:, None] & (c2 < H)[None, :]
        x2 = _load_tile(x_ptr, rows64, stride_x, c2, m2)
        g2 = _load_tile(g_ptr, rows64, stride_g, c2, m2)
        ss2, gx2 = _tile_sums(x2, g2, w2, c2, V, HAS_WEIGHT, HAS_VSIZE)
        ss += ss2
        gx += gx2
    var = ss / V
    if PRECISE:
        rstd = libdevice.rsqrt(var + eps)
    else:
        rstd = tl.math.rsqrt(var + eps)
    # rows past T: 0 (with eps = 0 their rstd is inf, and 0 * inf would poison dweight)
    rstd = tl.where(rmask, rstd, 0.0)
    coef = gx * (rstd * rstd * rstd) / V
    acc0 = _tile_dx(x0, g0, w0, acc0, rstd, coef, rows64, c0, m0, gr_ptr, dx_ptr, H, stride_gr,
                    V, X_DT, HAS_WEIGHT, HAS_VSIZE, HAS_GRES, PRECISE)
    if NT > 1:
        acc1 = _tile_dx(x1, g1, w1, acc1, rstd, coef, rows64, c1, m1, gr_ptr, dx_ptr, H,
                        stride_gr, V, X_DT, HAS_WEIGHT, HAS_VSIZE, HAS_GRES, PRECISE)
    if NT > 2:
        acc2 = _tile_dx(x2, g2, w2, acc2, rstd, coef, rows64, c2, m2, gr_ptr, dx_ptr, H,
                        stride_gr, V, X_DT, HAS_WEIGHT, HAS_VSIZE, HAS_GRES, PRECISE)
    return acc0, acc1, acc2


@triton.jit
def _load_weight(w_ptr, cols, H, stride_w, offset, HAS_WEIGHT: tl.constexpr):
    w = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32) + offset
    return w


@triton.jit
def _store_partial(dw_ptr, pid, acc, cols, H):
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=cols < H)


@triton.jit(do_not_specialize=["T"])
def rms_norm_backward_kernel(
    g_ptr, x_ptr, w_ptr,  # inputs: grad [T, H], x [T, H] (unit column stride), weight [H]
    gr_ptr,  # grad_residual [T, H] (fused add: added to dx)
    dx_ptr, dw_ptr,  # outputs: dx [T, H] contiguous, fp32 dweight partials [n_programs, H]
    T, H, stride_g, stride_x, stride_w, stride_gr,
    eps, offset, V,  # V: number of columns in the variance (variance_size)
    BLOCK_M: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    NT: tl.constexpr,  # the row in NT power-of-two column tiles W0 + W1 + W2 (the rest: 1, unused)
    HAS_WEIGHT: tl.constexpr, HAS_VSIZE: tl.constexpr, HAS_GRES: tl.constexpr,
    PRECISE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    if PRECISE:  # compiled: Python floats may arrive as fp64; the reference works in fp32
        # tl.cast, not .to(): Inductor's mutation analysis hands the floats in as Python floats,
        # and a failed analysis makes it copy every input (H200 run 17: 144 vs 120 us)
        eps = tl.cast(eps, tl.float32)
        offset = tl.cast(offset, tl.float32)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    c0 = tl.arange(0, W0)
    c1 = W0 + tl.arange(0, W1)
    c2 = W0 + W1 + tl.arange(0, W2)
    acc0 = tl.zeros([BLOCK_M, W0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, W1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, W2], dtype=tl.float32)
    w0 = _load_weight(w_ptr, c0, H, stride_w, offset, HAS_WEIGHT)
    w1 = _load_weight(w_ptr, c1, H, stride_w, offset, HAS_WEIGHT)  # past H (unused tile): masked
    w2 = _load_weight(w_ptr, c2, H, stride_w, offset, HAS_WEIGHT)
    n_blocks = tl.cdiv(T, BLOCK_M)
    if PRECISE:  # NUM_STAGES > 1: the next blocks' loads are issued while this one computes
        for block in tl.range(pid, n_blocks, n_programs, num_stages=NUM_STAGES):
            acc0, acc1, acc2 = _row_block(
                block, acc0, acc1, acc2, w0, w1, w2, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H, stride_g,
                stride_x, stride_gr, eps, V, BLOCK_M, W0, W1, W2, NT, HAS_WEIGHT, HAS_VSIZE,
                HAS_GRES, PRECISE)
    else:  # the interpreter cannot take a runtime bound in range() (numpy >= 2): same loop
        block = pid
        while block < n_blocks:
            acc0, acc1, acc2 = _row_block(
                block, acc0, acc1, acc2, w0, w1, w2, g_ptr, x_ptr, gr_ptr, dx_ptr, T, H, stride_g,
                stride_x, stride_gr, eps, V, BLOCK_M, W0, W1, W2, NT, HAS_WEIGHT, HAS_VSIZE,
                HAS_GRES, PRECISE)
            block += n_programs
    if HAS_WEIGHT:
        _store_partial(dw_ptr, pid, acc0, c0, H)
        if NT > 1:
            _store_partial(dw_ptr, pid, acc1, c1, H)
        if NT > 2:
            _store_partial(dw_ptr, pid, acc2, c2, H)


@triton.jit
def _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P: tl.constexpr):
    rows = p0 + tl.arange(0, BLOCK_P)
    mask = (rows < P)[:, None] & cmask[None, :]
    return acc + tl.load(p_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)


@triton.jit
def dweight_reduce_kernel(p_ptr, dw_ptr, P, H, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                          PRECISE: tl.constexpr):
    """``dw[c] = sum_p partials[p, c]`` in fp32, rounded once to dw's dtype."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < H
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if PRECISE:
        for p0 in range(0, P, BLOCK_P):
            acc = _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P)
    else:  # the interpreter: a while loop (see rms_norm_backward_kernel)
        p0 = 0
        while p0 < P:
            acc = _add_partials(acc, p_ptr, p0, P, H, cols, cmask, BLOCK_P)
            p0 += BLOCK_P
    dw = _round_to(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty, PRECISE)
    tl.store(dw_ptr + cols, dw, mask=cmask)
