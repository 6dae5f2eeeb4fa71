"""Per-tensor dynamic FP8 (``fp8_dynamic_tensor``) through the row kernel, in two passes.

One scale for the whole tensor needs every row's amax before any row can be quantized, so a
row-parallel kernel needs two passes over the activations (or a grid-wide barrier, which
Triton does not give):

1. the per-token FP8 launch (``*_fp8_dynamic``, with the call's scale arguments,
   ``quant.FP8Scale``): norm (and residual add) per row, and each row's value ``f(amax_row)``
   (a scale, or for "inverse" an inverse scale). The tensor's value is ``f(max_i amax_i)``,
   which is the max of the rows' values where ``f`` grows with amax ("divide", "multiply":
   clamps, ``/ 448`` and the rounding to x's dtype are monotonic) and their min where it
   shrinks ("inverse": ``448 / amax``, its clamp and the power-of-two rounding down), bit for
   bit; a NaN row makes both NaN (``amax`` / ``amin`` propagate it, as the reference's amax);
2. the static FP8 launch (``rms_norm_fp8_static``, ``quant_fp8_static``,
   ``rms_norm_gated_fp8_static``) with that value and the same ``scale_form`` (``y / s``,
   ``y * reciprocal(s)``, ``y * r``): the norm recomputed from x (and the gate; from
   ``residual_out`` after a residual add).

Both launches normalize with the same kernel code and launch config (pass 1's, the per-token
scheme's; a static launch alone takes other warps), so pass 2's ``y`` is pass 1's bit for bit.

Pass 1 writes no quantized values (``store_q=False``: the kernel gets no q pointer), only
the rows' scales (and ``residual_out``).

Bytes per element (16-bit activations), against the graph of the reference (norm kernel
writing y, amax reading it, quantize reading it again): rms_norm: 5 here (x read twice, q
written) vs 9 (x, y written, y read twice, q); with the residual add: 9 (x, r, h written,
h read, q) vs 13. Every scale form moves the same bytes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..ops import registry
from ..ops.quant import FP8Scale, fp8_dynamic_scale
from ..ops.spec import NormCall, OpSpec
from . import triton_ops as T

# op -> (its pass-1 op, its pass-2 op)
PASSES = {
    "quant_fp8_dynamic_tensor": ("quant_fp8_dynamic", "quant_fp8_static"),
    "rms_norm_fp8_dynamic_tensor": ("rms_norm_fp8_dynamic", "rms_norm_fp8_static"),
    "fused_add_rms_norm_fp8_dynamic_tensor": ("fused_add_rms_norm_fp8_dynamic", "rms_norm_fp8_static"),
    "rms_norm_gated_fp8_dynamic_tensor": ("rms_norm_gated_fp8_dynamic", "rms_norm_gated_fp8_static"),
}


def _tensor_scale(row_scales: torch.Tensor, x: torch.Tensor, how: FP8Scale) -> torch.Tensor:
    if row_scales.numel() == 0:  # no tokens: the scale of amax 0, as the reference gives
        return fp8_dynamic_scale(torch.zeros((), device=x.device), x.dtype, how)
    return row_scales.amin() if how.scale_form == "inverse" else row_scales.amax()


def _per_row(first: OpSpec, spec: OpSpec, call: NormCall) -> tuple:
    """Pass 1's arguments: the norm's, the per-token scheme's own defaults (no scale_ub) and
    the call's scale arguments, matched by name."""
    given = dict(zip((p.name for p in spec.scheme.parameters), call.qargs))
    names = [p.name for p in first.scheme.parameters]
    defaults = first.split(first.defaults).qargs
    return first.join(call._replace(qargs=tuple(given.get(n, d) for n, d in zip(names, defaults))))


def run(name: str, args: tuple, launch: Callable[..., Any] = T.run) -> Any:
    """``name`` (a ``*_fp8_dynamic_tensor`` op) on positional ``args``: two kernel launches,
    each ``launch(spec, args)`` (eager: ``triton_ops.run``; compiled: library_ops' wrap_triton
    launch, so Inductor sees both kernels and the amax between them)."""
    first, second = (registry.spec(n) for n in PASSES[name])
    spec = registry.spec(name)
    call = spec.split(args)
    how = FP8Scale(*call.qargs)  # the per-tensor scheme's arguments are FP8Scale's fields
    args1 = _per_row(first, spec, call)
    # Both passes take pass 1's launch config (the per-token scheme's), so they normalize in
    # the same reduction tree. A static launch alone takes twice the warps on one tile
    # (triton_ops.launch_config); on that config pass 1 ran 20% slower (H200 run 68).
    with T.launch_config_used(T.config_of(first, args1)):
        out1 = launch(first, args1, store_q=False)  # pass 1: the rows' scales only
        scale = _tensor_scale(out1[1], call.x, how)
        qargs = (scale, how.scale_form)
        if spec.residual:  # pass 2 normalizes residual_out, which pass 1 wrote
            h = out1[2]
            q = launch(second, second.join(call._replace(x=h, residual=None, qargs=qargs)))
            return q, scale, h
        q = launch(second, second.join(call._replace(qargs=qargs)))
    return q, scale


def accepts(name: str, args: tuple) -> bool:
    """Whether both launches take these arguments (the pass-1 kernel decides)."""
    spec, first = registry.spec(name), registry.spec(PASSES[name][0])
    return T.accepts(first, _per_row(first, spec, spec.split(args)))


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
