"""Compile the row kernel for sm_90 on the CPU from its constexprs (no GPU, no launch).

The runtime arguments' Triton types are derived from the kernel's own parameter list, so a
test names only the constexprs and the pointer dtypes it cares about: pointers default to
bf16 (``dtypes`` overrides them by name), the Python floats (eps, offsets) are fp32 and every
other runtime argument an i32. Pointers and the row strides are marked 16-byte aligned, as
Triton specializes torch's allocations; a constexpr set to None drops its pointer.
"""

from __future__ import annotations

import inspect

import pytest

FLOATS = ("eps", "offset", "x_eps", "x_offset")


def compile_row_kernel(const: dict, num_warps: int, dtypes: dict | None = None):
    """The CompiledKernel of ``norm_quant_kernel`` with ``const`` (unset constexprs take the
    kernel's defaults) and pointer dtypes ``dtypes`` (Triton names: "bf16", "fp32", ...)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from compile_norm.kernels import triton_kernel as K
    from compile_norm.kernels import triton_ops as O

    const = dict(const)
    names = K.norm_quant_kernel.arg_names
    for name, p in inspect.signature(K.norm_quant_kernel.fn).parameters.items():
        if p.default is not inspect.Parameter.empty:
            const.setdefault(name, p.default)
    sig = {}
    for name in names[:O._NUM_RUNTIME_ARGS]:
        if name in const:
            continue
        if name.endswith("_ptr"):
            sig[name] = f"*{(dtypes or {}).get(name, 'bf16')}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    sig.update({k: "constexpr" for k in const})
    aligned = [n for n in names if n.endswith("_ptr") and n not in const] + ["H", "stride_x", "stride_r"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n not in const}
    src = triton.compiler.ASTSource(K.norm_quant_kernel, sig, const, attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as e:  # a missing ptxas is an environment problem, not a bug
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
