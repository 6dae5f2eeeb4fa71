"""Triton provider ("triton") of ``rms_norm_backward``: the eager backward of rms_norm and
fused_add_rms_norm (kernels in ``triton_backward_kernel``).

One launch of ``rms_norm_backward_kernel`` (dx, plus ``grad_residual`` for fused add; fp32
dweight partials per program) and, with a weight and more than one program, one of
``dweight_reduce_kernel`` (the partials' column sums, rounded to the weight's dtype; one
program rounds its own sums: one launch at one token of 2K+ columns, or a few tokens of
per-head rows). The grid is persistent:
``sm_count * programs_per_sm`` programs at most, each looping over row blocks, so the partials
are ``[n_programs, H]`` fp32, a few MB, whatever the token count. Launches go through
``JITFunction.run`` (~20-30 us of host time each; nothing under CUDA-graph replay).

Tolerances against ``rms_norm_backward_ref`` (what tests/test_kernels_backward.py asserts,
against the reference evaluated in float64): dx within ``finfo(x.dtype).eps * |dx|`` plus
``(8 + 2 sqrt(H))`` fp32 eps times ``|g w rstd| + |x coef|`` (dx is a difference of those two
terms and may cancel); dweight within ``finfo(w.dtype).eps * |dw|`` plus
``(8 + 2 sqrt(T) + 2 sqrt(H))`` fp32 eps times ``sum_rows |g x rstd|`` (an fp32 sum over T
rows in another order than torch's). With ``grad_residual``, dx equals the kernel's dx without
it plus ``grad_residual`` in x.dtype, bit for bit.

supports: grad, x (and grad_residual) on CUDA (on CPU only under TRITON_INTERPRET=1), x
float16 / bfloat16 / float32 (float64 goes to native: gradcheck), grad and grad_residual of
x's dtype and shape, 1 <= hidden <= 65536, weight (if any) float16 / bfloat16 / float32 on the
device. Inputs whose last dim is not contiguous are copied first. The whole row (padded to a
power of two) is held in registers: no spills up to 8K columns (a few bytes at 2K-4K), some
at 16K, many at 64K (correct, slower).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import pathlib
from typing import NamedTuple

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


class BackwardConfig(NamedTuple):
    block_m: int  # rows per block (one loop iteration)
    block_h: int  # the row padded to a power of two
    num_warps: int
    programs_per_sm: int
    maxnreg: int | None  # register cap per thread (ptxas); None: none
    num_stages: int = 1  # software pipelining of the row-block loop (1: none)


WARPS_PER_SM = 16


@functools.lru_cache(maxsize=None)
def launch_config(hidden: int) -> BackwardConfig:
    """Rows per block, padded row width, warps, programs per SM, register cap, loop stages.

    Measured on the H200 (benchmarks/backward_sweep.py; RESULTS.md runs 20-21; bf16, the
    backward alone, ratio to copy at 6 bytes per element):

    - 8 warps on a block of ~4K elements (16 per thread and operand) and two programs per SM
      beat the H100-era guess (16-32 warps, 32 warps per SM, 64 registers) by 1.16-1.33x;
    - rows of 2K columns and more: the row-block loop software-pipelined over 3 stages (the
      next blocks' x and grad loads in flight while one block computes) with no register cap:
      8192x4096 65 us (0.84; 73 capped without pipelining, 84 before), 16384x8192 217 (0.90;
      260, 340), 8192x5376 99 (0.71; 113, 145), 2048x2048 21 (0.69; 23, 26). With the cap,
      pipelining spills and loses; a compiled graph launches without one anyway (wrap_triton
      takes no register cap), so eager and compiled run the same code;
    - rows of up to 1024 columns take no register cap (run 53, the backward alone, graph
      replay, us): a compiled graph launches without one, and with 78 registers instead of
      the cap's 106 the per-head kernel ran 21.8 us compiled against 16.8 eager at
      65536x128 (run 52). Uncapped, per-head rows (hidden <= 128) are fastest in blocks of
      8K elements, 8 warps, two programs per SM, not pipelined: 65536x128 25.3 (the old
      capped 32-row blocks 24.3, uncapped 28.5), 8192x128 11.7 (12.7), 32768x64 13.1
      (13.4; uncapped 14.4); 256-1024 columns in pipelined 4K-element blocks, 4 warps, two
      per SM: 16384x256 20.0 (20.9 capped, 23.1 uncapped), 8192x1024 24.3 (30.3).

    Rows wider than 8192 take more warps so a thread never holds more than 32 elements, and
    are not pipelined (3 stages of a 64K-column row need 512 KB of shared memory; 16K is
    not measured). A row that is not a power of two stays one padded tile: split into the
    forward kernel's column tiles (5376 = 4096 + 1024 + 256) the pipelined loop ran 1.7-2.6x
    slower (run 22: 8192x5376 163 against 99 us, 8192x3584 152 against 58). The
    persistent grid is that many programs per SM; the fp32 dweight partials (written and read
    once) cost ~2% of the traffic. Rows padded to 8192 columns take one program per SM (run
    47: 5-12% faster than two at 4096-16384 tokens, H 5376 and 8192; at 2048-4096 columns
    two stay faster there); ``programs`` narrows smaller grids further.
    """
    block_h = T._next_pow2(hidden)
    # rows of up to 1024 columns: no register cap, which a compiled graph could not keep
    if block_h <= 128:  # per-head rows: blocks of 8K elements, not pipelined
        return BackwardConfig(8192 // block_h, block_h, 8, 2, maxnreg=None)
    if block_h <= 1024:
        return BackwardConfig(4096 // block_h, block_h, 4, 2, maxnreg=None, num_stages=3)
    block_m = max(1, 4096 // block_h)
    elems = block_m * block_h
    num_warps = 8 if elems <= 8192 else min(32, elems // 1024)
    per_sm = max(1, WARPS_PER_SM // num_warps)
    if block_m <= 2 and block_h <= 8192:  # 3 stages of 16K+ columns overflow shared memory
        per_sm = 1 if block_h == 8192 else per_sm
        return BackwardConfig(block_m, block_h, num_warps, per_sm, maxnreg=None, num_stages=3)
    return BackwardConfig(block_m, block_h, num_warps, per_sm, 65536 // (32 * num_warps * per_sm))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_programs(x: torch.Tensor, per_sm: int) -> int:
    if T.INTERPRET:
        return 4  # a few programs, so the interpreter tests run the row loop and the reduction
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


SMALL_GRID_BLOCKS_PER_SM = 16


def programs(n_blocks, cfg: BackwardConfig, x: torch.Tensor):
    """The persistent grid: one program per row block up to the config's programs per SM,
    and for a pipelined config of 4K+ columns one per SM while there are fewer than 16 row
    blocks per SM. H200 runs 46-47 (eager backward, us, 4096 / 5376 columns): 256 tokens 15.3 /
    18.3 with 256 programs, 13.0 / 13.9 with 128; 1024 tokens 20.5 / 27.2 against 19.2 / 21.7;
    2048 tokens a tie at 4096 columns; 4096+ tokens two per SM faster at 4096 columns
    (40.5 against 44.7 us). Fewer programs also write fewer fp32 dweight partials."""
    per_sm = cfg.programs_per_sm
    if type(n_blocks) is int and cfg.num_stages > 1 and cfg.block_h >= 4096 and \
            n_blocks < SMALL_GRID_BLOCKS_PER_SM * _device_programs(x, 1):
        per_sm = 1  # (a symbolic token count keeps the config's: no new guard on it)
    return min(n_blocks, _device_programs(x, per_sm))


class ReduceConfig(NamedTuple):
    block_c: int  # columns per program
    block_p: int  # partial rows added per loop step
    num_warps: int
    num_stages: int = 1  # software pipelining of the loop over the partial rows (1: none)


# The dweight column sums: 16 columns a program, 64 partial rows a step, 4 warps, the loop
# over the partial rows pipelined over 3 stages. H200 runs 50 and 57 (eager backward, us;
# this config against the former 32 columns, 32 rows, unpipelined, and run 50's 256-column
# one): 2048x2048 16.4 / 17.1 / 20.4, 65536x128 24.5 / 25.3 / 27.9, 8192x4096 60.7 / 61.2 /
# 64.6, 256x4096 11.4 / 11.8 / 13.2, 32x4096 8.6 / 8.9 / 9.3; no slower at any of the 8
# shapes swept (benchmarks/backward_sweep.py --reduce; 34 configs, the next best 1% behind).
# Narrow blocks give the partials' read more programs (256 at 4096 columns), the stages
# keep several steps' loads in flight. The bits follow the block shape; one shape for every
# call keeps them the same eager and compiled, at every token count.
REDUCE_CONFIG = ReduceConfig(block_c=16, block_p=64, num_warps=4, num_stages=3)


def _launch(grid, kernel, args, kwargs, x: torch.Tensor, wrap=None) -> None:
    if wrap is not None:  # traced for Inductor (library_ops): a user-defined kernel it launches
        # wrap_triton takes num_warps / num_stages as launch options, not the register cap
        wrap(kernel)[grid](*args, **{k: v for k, v in kwargs.items() if k != "maxnreg"})
        return
    if not T.INTERPRET and x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def rms_norm_backward(grad, x, weight, eps, weight_offset=0.0, variance_size=None,
                      grad_residual=None, *, wrap=None):
    """The provider: ``(dx, dweight)`` as ``rms_norm_backward_ref`` computes them. ``wrap``
    (``torch.library.wrap_triton``) launches through it instead: the library op's body."""
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
    n_programs = programs(n_blocks, cfg, x)
    # one program (a symbolic count never): it writes dweight itself, no second launch
    direct = weight is not None and type(n_programs) is int and n_programs == 1
    dw_out = None  # what the kernel's dw_ptr writes: dweight itself, or the fp32 partials
    if weight is not None:
        dw_out = (torch.empty((hidden,), dtype=weight.dtype, device=dev) if direct else
                  torch.empty((n_programs, hidden), dtype=torch.float32, device=dev))
    vsize = hidden if variance_size is None else variance_size
    args = (
        g2, x2, x2 if weight is None else weight, gr2,
        dx, x2 if dw_out is None else dw_out,
        tokens, hidden, g2.stride(0), x2.stride(0), 1 if weight is None else weight.stride(0),
        gr2.stride(0),
        float(eps), float(weight_offset), vsize,
    )
    kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_H=cfg.block_h, HAS_WEIGHT=weight is not None,
                  HAS_VSIZE=vsize != hidden, HAS_GRES=grad_residual is not None,
                  PRECISE=not T.INTERPRET, NUM_STAGES=cfg.num_stages, DW_DIRECT=direct,
                  num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
    # traced (library_ops), the kernels are imported wherever triton is, GPU or not
    kernels = K if wrap is None else importlib.import_module(f"{__package__}.triton_backward_kernel")
    _launch((n_programs,), kernels.rms_norm_backward_kernel, args, kwargs, x, wrap)
    if weight is None:
        return dx, None
    if direct:
        return dx, dw_out
    dweight = torch.empty((hidden,), dtype=weight.dtype, device=dev)
    rc = REDUCE_CONFIG
    _launch((-(-hidden // rc.block_c),), kernels.dweight_reduce_kernel,
            (dw_out, dweight, n_programs, hidden),
            dict(BLOCK_P=rc.block_p, BLOCK_C=rc.block_c, PRECISE=not T.INTERPRET,
                 NUM_STAGES=rc.num_stages, num_warps=rc.num_warps), x, wrap)
    return dx, dweight


def written_args(kernel_name: str, kwargs: dict) -> list[str]:
    """The pointer arguments each backward kernel stores to, given its launch kwargs (what
    Triton's mutation analysis must find; CPU tests use it where it cannot run)."""
    if kernel_name == "dweight_reduce_kernel":
        return ["dw_ptr"]
    return ["dx_ptr", "dw_ptr"] if kwargs.get("HAS_WEIGHT") else ["dx_ptr"]


def register() -> None:
    """Register the "triton" provider of ``rms_norm_backward`` (unsupported: with the reason)."""
    registry.register_provider(OP, T.provider(rms_norm_backward, supports, SOURCE))
