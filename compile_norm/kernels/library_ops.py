"""The Triton kernel of every compile_norm op as a ``torch.library.triton_op``.

``torch.ops.compile_norm_kernels.<op>`` has the schema of ``torch.ops.compile_norm.<op>``
(``int`` appears as ``SymInt``) and is implemented by one ``wrap_triton`` launch of
``triton_kernel.norm_quant_kernel``. Because the implementation is traceable, Inductor sees a
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
import typing
from typing import Any, Callable, Optional

import torch

from ..ops import registry
from ..ops.fused import add_norm_op_name, norm_op_name
from ..ops.quant import SCHEMES, quant_op_name
from . import triton_ops as T

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


@functools.cache
def _arg_names() -> tuple:
    return tuple(K.norm_quant_kernel.arg_names)


def _run(x, residual, weight, eps, offset, vsize, do_norm, store_out, spec):
    # The same outputs and arguments as the eager provider; the launch goes through
    # wrap_triton so Inductor sees a user-defined Triton kernel.
    out, quant_out, res_out, launch = T.prepare_launch(
        x, residual, weight, eps, offset, vsize, do_norm, store_out, spec
    )
    if launch is not None:
        grid0, args, consts, num_warps = launch
        kwargs = dict(zip(_arg_names()[len(args):], consts), num_warps=num_warps)
        wrap_triton(K.norm_quant_kernel)[(grid0,)](*args, **kwargs)
    return out, quant_out, res_out


def _single(outputs: tuple) -> Any:
    return outputs[0] if len(outputs) == 1 else outputs


# --- one implementation per op (positional arguments in schema order) ---------------------------


def _rms_norm(x, w, eps, off, vs):
    return _run(x, None, w, eps, off, vs, True, True, T._NO_QUANT)[0]


def _fused_add_rms_norm(x, r, w, eps, off, vs):
    out, _, res_out = _run(x, r, w, eps, off, vs, True, True, T._NO_QUANT)
    return out, res_out


def _implementations() -> dict[str, Callable[..., Any]]:
    # (no lambdas: triton_op parses the implementation's source to find its kernels)
    impls: dict[str, Callable[..., Any]] = {
        "rms_norm": _rms_norm,
        "fused_add_rms_norm": _fused_add_rms_norm,
    }
    for scheme in SCHEMES:
        spec_of = T.SPECS[scheme]

        def quant(x, *qargs, spec_of=spec_of):
            return _single(_run(x, None, None, 0.0, 0.0, None, False, False, spec_of(*qargs))[1])

        def norm(x, w, eps, *rest, spec_of=spec_of):
            *qargs, off, vs = rest
            return _single(_run(x, None, w, eps, off, vs, True, False, spec_of(*qargs))[1])

        def add_norm(x, r, w, eps, *rest, spec_of=spec_of):
            *qargs, off, vs = rest
            _, quant_out, res_out = _run(x, r, w, eps, off, vs, True, False, spec_of(*qargs))
            return (*quant_out, res_out)

        impls[quant_op_name(scheme)] = quant
        impls[norm_op_name(scheme)] = norm
        impls[add_norm_op_name(scheme)] = add_norm
    return impls


_ANNOTATION = {
    "Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "float": float,
    "float?": Optional[float], "int": int, "SymInt": int, "int?": Optional[int],
    "SymInt?": Optional[int], "bool": bool,
}


def _signature(name: str) -> inspect.Signature:
    """The Python signature of ``compile_norm::<name>``'s schema (for schema inference)."""
    schema = getattr(getattr(torch.ops, registry.NAMESPACE), name).default._schema
    params = []
    for a in schema.arguments:
        ann = _annotation(a.type)
        default = a.default_value if a.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=default, annotation=ann))
    n = len(schema.returns)
    ret = torch.Tensor if n == 1 else typing.Tuple[tuple(torch.Tensor for _ in range(n))]
    return inspect.Signature(params, return_annotation=ret)


def _annotation(jit_type: Any) -> Any:
    text = str(jit_type)
    if text.endswith("?"):
        return _ANNOTATION[text]
    if text.startswith("Optional["):
        return _ANNOTATION[text[len("Optional["):-1] + "?"]
    return _ANNOTATION[text]


def _make_fn(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    sig = _signature(name)

    def fn(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return impl(*bound.arguments.values())

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__signature__ = sig
    fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    fn.__annotations__["return"] = sig.return_annotation
    return fn


@functools.cache
def functions() -> dict[str, Callable[..., Any]]:
    """{op name: traceable implementation with the op's signature} (no registration)."""
    if not AVAILABLE:
        raise RuntimeError(f"compile_norm: kernel library ops unavailable: {REASON}")
    return {name: _make_fn(name, impl) for name, impl in _implementations().items()}


_LOCK = threading.Lock()
_OPS: dict[str, Any] = {}


def register() -> dict[str, Any]:
    """Declare ``compile_norm_kernels::<op>`` for every op (once); {name: OpOverload}."""
    with _LOCK:
        if not _OPS:
            for name, fn in functions().items():
                op = triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
                _OPS[name] = op._opoverload
        return dict(_OPS)


def overload(name: str) -> Any:
    return register()[name]


def supports(name: str, *args: Any) -> bool:
    """Whether the Triton kernel accepts these (fake or real) arguments."""
    try:
        return bool(T.FUNCTIONS[name][1](*args))
    except Exception:
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
    if quant in (2, 3, 5, 6):
        names.append("s_ptr")
    if quant == 6:
        names.append("azp_ptr")
    return names
