"""Triton provider ("triton") of ``rms_norm_backward``: the eager backward of rms_norm and
fused_add_rms_norm (kernels in ``triton_backward_kernel``).

One launch of ``rms_norm_backward_kernel`` (dx, plus ``grad_residual`` for fused add; fp32
dweight partials per program) and, with
a weight, one of ``dweight_reduce_kernel`` (the partials' column sums, rounded to the weight's
dtype). The grid is persistent: ``sm_count * programs_per_sm`` programs at most, each looping
over row blocks, so the partials are ``[n_programs, H]`` fp32, a few MB, whatever the token
count.

Tolerances against ``rms_norm_backward_ref`` (what tests/test_kernels_backward*.py assert):
dx within 1 ulp of x.dtype of the float64 reference plus the fp32 rounding of its two terms
(``|g w rstd| + |x coef|`` times a few fp32 eps: dx is a difference and may cancel);
dweight within 1 ulp of the weight's dtype plus ``(8 + 2 sqrt(T) + 2 sqrt(H))`` fp32 eps times
``sum_rows |g x rstd|`` (an fp32 sum over T rows in another order than torch's).

supports: grad and x on CUDA (on CPU only under TRITON_INTERPRET=1), x float16 / bfloat16 /
float32 (float64 goes to native: gradcheck), grad of x's dtype, 1 <= hidden <= 65536, weight
(if any) float16 / bfloat16 / float32 on the device. Inputs whose last dim is not contiguous
are copied first. The whole row (padded to a power of two) is held in registers: fast up to
16K columns, correct (spilling) up to 65536.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import torch

from ..ops import registry
from . import triton_ops as T

OP = "rms_norm_backward"
PROVIDER = T.PROVIDER
K = None
if T.K is not None:  # triton imported (GPU, or the interpreter)
    from . import triton_backward_kernel as K

SUPPORTED, REASON = T.SUPPORTED, T.REASON
_HERE = pathlib.Path(__file__).parent
SOURCE = hashlib.sha256(
    b"".join((_HERE / f).read_bytes()
             for f in ("triton_backward.py", "triton_backward_kernel.py", "triton_kernel.py"))
).hexdigest()


def _like_x(t, x) -> bool:
    return isinstance(t, torch.Tensor) and T._on_device(t) and t.dtype == x.dtype and t.shape == x.shape


def supports(grad, x, weight, eps, weight_offset=0.0, variance_size=None, grad_residual=None) -> bool:
    return (
        T._norm_ok(x, weight, variance_size)
        and _like_x(grad, x)
        and (grad_residual is None or _like_x(grad_residual, x))
    )


class BackwardConfig:
    __slots__ = ("block_m", "block_h", "num_warps", "programs_per_sm")

    def __init__(self, block_m: int, block_h: int, num_warps: int, programs_per_sm: int):
        self.block_m, self.block_h = block_m, block_h
        self.num_warps, self.programs_per_sm = num_warps, programs_per_sm


@functools.lru_cache(maxsize=None)
def launch_config(hidden: int) -> BackwardConfig:
    """Rows per block, padded row width, warps and programs per SM for a hidden size.

    Each element holds x, g and the dweight accumulator in fp32 registers (plus w per
    column): about 16 elements per thread keeps that near 64 registers, so warps grow with
    the block (4 to 16; 32 at 32K elements and up, which spills but stays correct). Small rows
    take several rows per block (~2K elements). Programs per SM keep ~16 warps resident per SM
    (2 programs of 8 warps at hidden 4096) while the fp32 partials stay a few % of the traffic.
    """
    block_h = T._next_pow2(hidden)
    block_m = max(1, 2048 // block_h)
    elems = block_m * block_h
    if elems >= 32768:
        num_warps = 32
    else:
        num_warps = min(16, max(4, 1 << ((elems // 512).bit_length() - 1) if elems >= 512 else 4))
    return BackwardConfig(block_m, block_h, num_warps, max(1, 16 // num_warps))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_programs(x: torch.Tensor, per_sm: int) -> int:
    if T.INTERPRET:
        return 4  # a few programs, so the interpreter tests run the row loop and the reduction
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


def _launch(grid, kernel, args, kwargs, x: torch.Tensor) -> None:
    if not T.INTERPRET and x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def rms_norm_backward(grad, x, weight, eps, weight_offset=0.0, variance_size=None,
                      grad_residual=None):
    """The provider: ``(dx, dweight)`` as ``rms_norm_backward_ref`` computes them."""
    hidden = x.shape[-1]
    dev = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    x2 = T._rows(x, hidden)
    g2 = T._rows(grad, hidden)
    gr2 = g2 if grad_residual is None else T._rows(grad_residual, hidden)
    tokens = x2.shape[0]
    if tokens == 0:
        dweight = None if weight is None else torch.zeros_like(weight, memory_format=torch.contiguous_format)
        return dx, dweight
    cfg = launch_config(hidden)
    n_blocks = -(-tokens // cfg.block_m)
    programs = min(n_blocks, _device_programs(x, cfg.programs_per_sm))
    partials = None
    if weight is not None:
        partials = torch.empty((programs, hidden), dtype=torch.float32, device=dev)
    vsize = hidden if variance_size is None else variance_size
    args = (
        g2, x2, x2 if weight is None else weight, gr2,
        dx, x2 if partials is None else partials,
        tokens, hidden, g2.stride(0), x2.stride(0), 1 if weight is None else weight.stride(0),
        gr2.stride(0),
        float(eps), float(weight_offset), vsize,
    )
    kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_H=cfg.block_h, HAS_WEIGHT=weight is not None,
                  HAS_VSIZE=vsize != hidden, HAS_GRES=grad_residual is not None,
                  PRECISE=not T.INTERPRET, num_warps=cfg.num_warps)
    _launch((programs,), K.rms_norm_backward_kernel, args, kwargs, x)
    if weight is None:
        return dx, None
    dweight = torch.empty((hidden,), dtype=weight.dtype, device=dev)
    block_c = 256
    block_p = max(1, min(32, T._next_pow2(programs)))
    _launch((-(-hidden // block_c),), K.dweight_reduce_kernel,
            (partials, dweight, programs, hidden),
            dict(BLOCK_P=block_p, BLOCK_C=block_c, PRECISE=not T.INTERPRET, num_warps=4), x)
    return dx, dweight


def _unavailable(*args, **kwargs):
    raise RuntimeError(f"compile_norm: the triton provider cannot run here: {REASON}")


def register() -> None:
    """Register the "triton" provider of ``rms_norm_backward`` (unsupported: with the reason)."""
    registry.register_provider(
        OP,
        registry.Provider(
            name=PROVIDER,
            fn=rms_norm_backward if SUPPORTED else _unavailable,
            supported=SUPPORTED,
            supports=supports,
            rank=T.RANK,
            reason=REASON,
            source=SOURCE,
        ),
    )
