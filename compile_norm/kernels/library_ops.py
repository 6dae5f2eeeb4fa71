"""The Triton kernel of every compile_norm op as a ``torch.library.triton_op``.

``torch.ops.compile_norm_kernels.<op>`` has the schema of ``torch.ops.compile_norm.<op>`` (both
inferred from the op's reference) and is implemented by one ``wrap_triton`` launch of
``triton_kernel.norm_quant_kernel``, prepared exactly as the eager provider prepares it
(``triton_ops.prepare``); the per-tensor dynamic FP8 ops by two such launches, as their eager
provider (``two_pass``). ``functions()`` also has ``rms_norm_backward``: the two launches of
its eager provider (``triton_backward``: dx with the residual gradient, then the dweight
column sums), traced by the lower pass; it is not declared as a triton_op (see register()). Because the implementation is traceable, Inductor sees a
user-defined Triton kernel, not an opaque extern call: it works under CUDA graphs and
AOTInductor, and Inductor plans the outputs' memory.

- User code (or ``torch.export``) may call the ops directly; AOTAutograd decomposes them into
  ``triton_kernel_wrapper_functional`` nodes.
- The ``lower`` pass (kernel choice) runs after AOTAutograd, so it inlines ``trace(name)``'s
  functional graph of the same implementation (see ``functional_trace``).

Importing this module never needs triton or a GPU: ``AVAILABLE`` / ``REASON`` say whether the
ops could be registered; ``register()`` does it (idempotent; only with triton importable).
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any, Callable

import torch

from ..ops import registry
from ..ops.spec import OpSpec
from . import triton_backward as B
from . import triton_ops as T
from . import two_pass as TP

NAMESPACE = "compile_norm_kernels"

K = None
triton = None
wrap_triton = None
triton_op = None
REASON = ""
try:  # triton is importable without a GPU; launching needs one (or the interpreter)
    import triton  # noqa: F401  (importable: the availability check)

    from torch.library import triton_op, wrap_triton

    from . import triton_kernel as K
except Exception as e:  # ImportError, old torch, broken triton
    REASON = f"triton / torch.library.triton_op not importable ({type(e).__name__}: {e})"
AVAILABLE = not REASON


def _launch_wrapped(spec: OpSpec, args: tuple, store_q: bool = True) -> Any:
    # The eager provider's launch (triton_ops.prepare), through wrap_triton so Inductor sees
    # a user-defined Triton kernel.
    launch = T.prepare(spec, args, store_q)
    if not (isinstance(launch.grid0, int) and launch.grid0 == 0):  # a SymInt may be 0: launch
        wrap_triton(K.norm_quant_kernel)[(launch.grid0,)](
            *launch.args, **launch.const_kwargs(), num_warps=launch.num_warps)
    return launch.outputs


def _launch_two_pass(spec: OpSpec, args: tuple) -> Any:
    # per-tensor dynamic FP8: the eager provider's two launches (kernels/two_pass.py), each
    # through wrap_triton, and the tensor's scale between them in torch ops
    return TP.run(spec.name, args, _launch_wrapped)


def _launch_backward(spec: OpSpec, args: tuple) -> Any:
    # the eager provider's two launches (dx [+ grad_residual] and dweight partials, their
    # column sums), through wrap_triton
    return B.rms_norm_backward(*args, wrap=wrap_triton)


def _implementation(spec: OpSpec, launch: Callable[[OpSpec, tuple], Any] = _launch_wrapped) -> Callable[..., Any]:
    """A function with the op's signature (triton_op infers the schema from it)."""

    def implementation(*args, **kwargs):
        return launch(spec, spec.bind(args, kwargs))

    implementation.__name__ = implementation.__qualname__ = spec.name
    implementation.__signature__ = inspect.signature(spec.reference, eval_str=True)
    return implementation


@functools.cache
def functions() -> dict[str, Callable[..., Any]]:
    """{op name: traceable implementation with the op's signature} (no registration)."""
    if not AVAILABLE:
        raise RuntimeError(f"compile_norm: kernel library ops unavailable: {REASON}")
    funcs = {spec.name: _implementation(spec) for spec in T.kernel_specs()}
    funcs.update({name: _implementation(registry.spec(name), _launch_two_pass) for name in TP.PASSES})
    funcs[B.OP] = _implementation(registry.spec(B.OP), _launch_backward)
    return funcs


def _arg_names() -> tuple:
    return tuple(K.norm_quant_kernel.arg_names)


_LOCK = threading.Lock()
_OPS: dict[str, Any] = {}


def register() -> dict[str, Any]:
    """Declare ``compile_norm_kernels::<op>`` for every op (once); {name: OpOverload}."""
    with _LOCK:
        if not _OPS:
            for name, fn in functions().items():
                if name == B.OP:
                    # an optional output (dweight): triton_op infers its schema from the
                    # annotations, which cannot say so (torch 2.13 ignores ``schema=``). The
                    # lower pass traces ``functions()`` itself, so its lowering is the same.
                    continue
                triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
                _OPS[name] = getattr(getattr(torch.ops, NAMESPACE), name).default
        return dict(_OPS)


def overload(name: str) -> Any:
    return register()[name]


def supports(name: str, *args: Any) -> bool:
    """Whether the Triton kernel accepts these (fake or real) arguments."""
    try:
        if name in TP.PASSES:
            return TP.accepts(name, registry.spec(name).bind(args, {}))
        check = B.supports if name == B.OP else T.FUNCTIONS[name][1]
        return bool(check(*args))
    except Exception:  # a check that cannot judge these (symbolic) arguments: no kernel
        return False


def functional_trace(fn: Callable[..., Any], args: Any) -> torch.fx.GraphModule:
    """Trace ``fn`` into a functional ATen graph: each ``wrap_triton`` launch becomes a
    ``triton_kernel_wrapper_functional`` node (what AOTAutograd makes of a triton_op), which
    Inductor's post-grad passes turn into an in-place user-defined Triton kernel."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.traceback import preserve_node_meta

    with enable_python_dispatcher(), preserve_node_meta():
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"),
                     tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def written_args(kwargs: dict[str, Any]) -> list[str]:
    """The pointer arguments ``norm_quant_kernel`` stores to, given its launch kwargs (what
    Triton's mutation analysis must find; CPU tests use it where that analysis cannot run)."""
    names = []
    if kwargs.get("STORE_OUT"):
        names.append("out_ptr")
    if kwargs.get("HAS_RES"):
        names.append("res_out_ptr")
    quant = kwargs.get("QUANT", 0)
    if quant:
        names.append("q_ptr")
    if quant in (2, 3, 5, 6, 7):
        names.append("s_ptr")
    if quant == 6:
        names.append("azp_ptr")
    return names
