"""Per-tensor dynamic FP8 (``fp8_dynamic_tensor``) through the row kernel, in two passes.

One scale for the whole tensor needs every row's amax before any row can be quantized, so a
row-parallel kernel needs two passes over the activations (or a grid-wide barrier, which
Triton does not give):

1. the per-token FP8 launch (``*_fp8_dynamic``): norm (and residual add) per row, and each
   row's scale ``max(amax_row / 448, 1 / (448 * 512))``; the tensor's scale is their max (the
   clamp and the division are monotonic, so ``max_i clamp(a_i / 448) = clamp(max_i a_i / 448)``
   bit for bit, NaN included);
2. the static FP8 launch (``rms_norm_fp8_static``, ``quant_fp8_static``,
   ``rms_norm_gated_fp8_static``) with that scale: the norm recomputed from x (and the gate;
   from ``residual_out`` after a residual add), ``q = sat(y / scale)``.

Both launches normalize with the same kernel code, so pass 2's ``y`` is pass 1's bit for bit.

Bytes per element (16-bit activations), against the graph of the reference (norm kernel
writing y, amax reading it, quantize reading it again): rms_norm: 6 here (x read twice, q
written, plus pass 1's q: written, never read) vs 9 (x, y written, y read twice, q); with
the residual add: 10 (x, r, h written, h read, q, pass 1's q) vs 13. A pass 1 without its q
store (a kernel constexpr) would make those 5 and 9.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import registry
from ..ops.quant import FP8_MIN_SCALE
from . import triton_ops as T

# op -> (its pass-1 op, its pass-2 op)
PASSES = {
    "quant_fp8_dynamic_tensor": ("quant_fp8_dynamic", "quant_fp8_static"),
    "rms_norm_fp8_dynamic_tensor": ("rms_norm_fp8_dynamic", "rms_norm_fp8_static"),
    "fused_add_rms_norm_fp8_dynamic_tensor": ("fused_add_rms_norm_fp8_dynamic", "rms_norm_fp8_static"),
    "rms_norm_gated_fp8_dynamic_tensor": ("rms_norm_gated_fp8_dynamic", "rms_norm_gated_fp8_static"),
}


def _tensor_scale(row_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if row_scales.numel() == 0:  # no tokens: the minimum scale, as the reference gives
        return torch.full((), FP8_MIN_SCALE, dtype=torch.float32, device=x.device)
    return row_scales.amax()


def _per_row(first, call):
    """Pass 1's arguments: the norm's, and the per-token scheme's defaults (no scale_ub, the
    minimum scale the per-tensor reference takes)."""
    return first.join(call._replace(qargs=first.split(first.defaults).qargs))


def run(name: str, args: tuple) -> Any:
    """``name`` (a ``*_fp8_dynamic_tensor`` op) on positional ``args``: two kernel launches."""
    first, second = (registry.spec(n) for n in PASSES[name])
    spec = registry.spec(name)
    call = spec.split(args)
    # pass 1: per-row scales (the fp8_dynamic launch; scale_ub None)
    out1 = T.run(first, _per_row(first, call))
    scale = _tensor_scale(out1[1], call.x)
    if spec.residual:  # pass 2 normalizes residual_out, which pass 1 wrote
        h = out1[2]
        q = T.run(second, second.join(call._replace(x=h, residual=None, qargs=(scale,))))
        return q, scale, h
    q = T.run(second, second.join(call._replace(qargs=(scale,))))
    return q, scale


def accepts(name: str, args: tuple) -> bool:
    """Whether both launches take these arguments (the pass-1 kernel decides)."""
    spec, first = registry.spec(name), registry.spec(PASSES[name][0])
    return T.accepts(first, _per_row(first, spec.split(args)))


def _functions(name: str) -> tuple:
    spec = registry.spec(name)

    def fn(*args, **kwargs):
        return run(name, spec.bind(args, kwargs))

    def supports(*args, **kwargs):
        return accepts(name, spec.bind(args, kwargs))

    fn.__name__ = supports.__name__ = name
    return fn, supports


def register() -> None:
    """Register the two-pass "triton" provider of each per-tensor dynamic FP8 op."""
    for name in PASSES:
        fn, supports = _functions(name)
        registry.register_provider(name, T.provider(fn, supports, T.SOURCE))
