"""Op declaration, kernel providers, priorities and eager dispatch.

``declare(spec)`` makes one ``torch.library`` operator ``compile_norm::<name>`` from an
``OpSpec`` (``ops/spec.py``) through torch's public custom-op API: ``Library.define`` with the
schema ``torch.library.infer_schema`` derives from the reference, a CPU and a CUDA
implementation that dispatch to providers, ``torch.library.register_fake`` and, for the float
ops, ``torch.library.register_autograd``. It returns the op's public callable (``Op``), which
on plain eager tensors skips torch's dispatcher and Python custom-op layers and calls the
chosen provider directly (with the same autograd formula through ``torch.autograd.Function``
when a gradient is needed), and calls the torch op whenever something traces.

A provider runs a call when its static ``supported`` flag and per-call
``supports(*args)`` both hold; ``native`` (the reference) is registered with every op, sits
last, and accepts everything. Priority order, most specific first:
  1. a scoped override (``with providers_priority(...)``), private to the thread/task;
  2. a process-wide setting (``set_priority``);
  3. the ``COMPILE_NORM_PROVIDERS`` environment variable, read at import:
     ``"triton,native"`` for every op or ``"rms_norm=native;*=triton,native"`` per op;
  4. each provider's registration ``rank`` (lower first).
A name no op has is an error (ValueError naming the setting and the registered providers);
a name registered for other ops only is skipped for this one. A list that names ``native`` ends there
(``["native"]`` forces the reference); otherwise providers left out of the list keep their
default order after the listed ones, with ``native`` always last.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .spec import Kind, OpSpec, op_name

NAMESPACE = "compile_norm"
NATIVE = "native"
ENV_VAR = "COMPILE_NORM_PROVIDERS"


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


@dataclass(frozen=True)
class Provider:
    """One implementation of an op.

    ``fn`` has the op's exact signature. ``supported`` says whether it can run in this
    process at all (``reason`` says why not); ``supports`` is the cheap per-call check that
    must reject every call whose numerics the provider cannot reproduce.
    """

    name: str
    fn: Callable[..., Any]
    supported: bool = True
    supports: Callable[..., bool] = _always
    rank: int = 100
    reason: str = ""
    source: str = ""  # text whose change changes results (kernel source); feeds cache keys


@dataclass
class OpEntry:
    spec: OpSpec
    op: Any = None  # the public callable (``Op``)
    providers: dict[str, Provider] = field(default_factory=dict)
    chain: tuple[Provider, ...] = ()  # supported providers in default priority order

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def reference(self) -> Callable[..., Any]:
        return self.spec.reference


_OPS: dict[str, OpEntry] = {}
_GLOBAL_PRIORITY: dict[str, tuple[str, ...]] = {}
_SCOPED_PRIORITY: contextvars.ContextVar[Mapping[str, tuple[str, ...]] | None] = (
    contextvars.ContextVar("compile_norm_scoped_priority", default=None)
)


def _parse_priority_spec(spec: str) -> dict[str, tuple[str, ...]]:
    """Parse ``"triton,native"`` or ``"rms_norm=native;*=triton,native"``."""
    result: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        op, sep, names = part.rpartition("=") if "=" in part else ("*", "=", part)
        op = op.strip() or "*"
        result[op] = tuple(n.strip() for n in names.split(",") if n.strip())
    return result


_ENV_PRIORITY: dict[str, tuple[str, ...]] = _parse_priority_spec(os.environ.get(ENV_VAR, ""))


def _order(entry: OpEntry, names: Iterable[str]) -> tuple[Provider, ...]:
    """Providers of ``entry`` that can run here: ``names`` first, then (unless ``names``
    stops at native) the rest by rank, native last."""
    usable = {n: p for n, p in entry.providers.items() if p.supported}
    head: list[Provider] = []
    for n in names:
        if n == NATIVE:  # native accepts every call: nothing after it could ever run
            return (*head, usable[NATIVE])
        if n in usable and usable[n] not in head:
            head.append(usable[n])
    tail = sorted(
        (p for n, p in usable.items() if n != NATIVE and p not in head), key=lambda p: p.rank
    )
    return (*head, *tail, usable[NATIVE])


def _lookup(table: Mapping[str, tuple[str, ...]], op: str) -> tuple[str, ...] | None:
    return table.get(op, table.get("*"))


def _rebuild(entry: OpEntry) -> None:
    names = _lookup(_GLOBAL_PRIORITY, entry.name)
    if names is None:
        names = _lookup(_ENV_PRIORITY, entry.name) or ()
    entry.chain = _order(entry, names)


def _rebuild_all() -> None:
    for entry in _OPS.values():
        _rebuild(entry)


def _entry(op: str) -> OpEntry:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(
            f"compile_norm: unknown op {op!r}; known ops: {', '.join(sorted(_OPS))}"
        ) from None


def chain(op: str) -> tuple[Provider, ...]:
    """The providers ``op`` would try, in order, in the current thread/task."""
    entry = _entry(op)
    scoped = _SCOPED_PRIORITY.get()
    if scoped is not None:
        names = _lookup(scoped, op)
        if names is not None:
            return _order(entry, names)
    return entry.chain


def _run(entry: OpEntry, args: tuple) -> Any:
    providers = entry.chain if _SCOPED_PRIORITY.get() is None else chain(entry.name)
    for provider in providers:
        if provider.supports(*args):
            return provider.fn(*args)
    raise AssertionError("unreachable: native accepts every call")  # pragma: no cover


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` with the first provider that accepts these arguments (the eager hot path).

    Arguments are not validated here; the op itself (``torch.ops.compile_norm.*``) does that.
    """
    entry = _OPS[op]
    return _run(entry, entry.spec.bind(args, kwargs))


def normalize_call(op: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments as providers receive them: positional, defaults filled in (no keywords)."""
    return _entry(op).spec.bind(tuple(args), dict(kwargs)), {}


def which_provider(op: str, *args: Any, **kwargs: Any) -> str:
    """Name of the provider an eager call of ``op`` with these arguments would use."""
    args, kwargs = normalize_call(op, args, kwargs)
    for provider in chain(op):
        if provider.supports(*args, **kwargs):
            return provider.name
    raise AssertionError("unreachable: native accepts every call")  # pragma: no cover


def register_provider(op: str, provider: Provider) -> None:
    """Add (or replace) a provider of ``op``. ``native`` cannot be replaced."""
    entry = _entry(op)
    if provider.name == NATIVE:
        raise ValueError("compile_norm: the 'native' provider is the reference and is fixed")
    entry.providers[provider.name] = provider
    _rebuild_all()


def unregister_provider(op: str, name: str) -> None:
    entry = _entry(op)
    if name == NATIVE:
        raise ValueError("compile_norm: the 'native' provider cannot be removed")
    entry.providers.pop(name, None)
    _rebuild_all()


def providers(op: str) -> dict[str, Provider]:
    """Every provider registered for ``op``, supported here or not."""
    return dict(_entry(op).providers)


def unsupported_reasons(op: str) -> dict[str, str]:
    """Providers of ``op`` that cannot run in this process, with the reason for each."""
    return {n: p.reason for n, p in _entry(op).providers.items() if not p.supported}


def _normalize(priority: Mapping[str, Iterable[str]] | Iterable[str] | str,
               what: str = "priority") -> dict[str, tuple[str, ...]]:
    """``priority`` as ``{op or "*": names}``; unknown ops and names no op has are errors
    (a name some ops lack, such as "triton" for an op without a kernel, is skipped there)."""
    if isinstance(priority, str):
        table = _parse_priority_spec(priority)
    elif isinstance(priority, Mapping):
        table = {op: tuple(names) for op, names in priority.items()}
    else:
        table = {"*": tuple(priority)}
    known = sorted({n for entry in _OPS.values() for n in entry.providers})
    for op, names in table.items():
        if op != "*":
            _entry(op)
        for name in names:
            if not isinstance(name, str) or name not in known:
                raise ValueError(f"compile_norm: {what} names provider {name!r}, which no op has; "
                                 f"registered providers: {', '.join(known)}")
    return table


def check_priority(priority: Mapping[str, Iterable[str]] | Iterable[str] | str,
                   what: str = "priority") -> None:
    """Raise ValueError (naming ``what``) if ``priority`` names an unknown op or provider."""
    _normalize(priority, what)


def check_env_priority() -> None:
    """Warn (once, at import) when ``COMPILE_NORM_PROVIDERS`` names a provider no op has:
    a typo, or a provider the program registers later (which the setting then applies to,
    so this is no error)."""
    if _ENV_PRIORITY:
        try:
            check_priority(os.environ.get(ENV_VAR, ""), f"the environment variable {ENV_VAR}")
        except ValueError as e:
            warnings.warn(f"{e} (yet: a provider registered later is taken)", UserWarning,
                          stacklevel=3)


def set_priority(priority: Mapping[str, Iterable[str]] | Iterable[str] | str | None) -> None:
    """Set the process-wide provider priority.

    ``priority`` is a list of provider names for every op, a mapping ``{op: [names]}``
    (``"*"`` for the rest), a spec string as in ``COMPILE_NORM_PROVIDERS``, or None to reset.
    """
    _GLOBAL_PRIORITY.clear()
    if priority is not None:
        _GLOBAL_PRIORITY.update(_normalize(priority))
    _rebuild_all()


@contextlib.contextmanager
def providers_priority(
    priority: Mapping[str, Iterable[str]] | Iterable[str] | str,
) -> Iterator[None]:
    """Scoped provider priority, private to the current thread (or asyncio task)."""
    table = dict(_SCOPED_PRIORITY.get() or {})
    table.update(_normalize(priority))
    token = _SCOPED_PRIORITY.set(table)
    try:
        yield
    finally:
        _SCOPED_PRIORITY.reset(token)


def priority_state() -> tuple:
    """Everything about provider choice that can change a compiled graph (for cache keys):
    each op's provider chain as this thread would use it. A function of state only, so equal
    chains give equal keys, however they were reached."""
    return tuple((op, tuple((p.name, p.source) for p in chain(op))) for op in sorted(_OPS))


def ops() -> dict[str, OpEntry]:
    return dict(_OPS)


# --- lookups by what an op is --------------------------------------------------------------


def spec(op: str) -> OpSpec:
    return _entry(op).spec


def specs() -> list[OpSpec]:
    return [entry.spec for entry in _OPS.values()]


def find(kind: Kind, scheme: str | None = None) -> OpSpec | None:
    """The op of ``kind`` (and ``scheme``), if declared."""
    entry = _OPS.get(op_name(kind, scheme))
    return entry.spec if entry is not None else None


def overload(op: str | OpSpec) -> Any:
    """``torch.ops.compile_norm.<op>.default``."""
    name = op if isinstance(op, str) else op.name
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def spec_of(target: Any) -> OpSpec | None:
    """The spec of a graph node's target if it is a compile_norm op, else None."""
    if getattr(target, "namespace", None) != NAMESPACE:
        return None
    entry = _OPS.get(target._schema.name.split("::")[1])
    return entry.spec if entry is not None else None


# --- when an eager call may skip the dispatcher --------------------------------------------

# nn.Parameter (model weights) is a subclass without dispatch behaviour: plain for the dispatcher
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_call(args: tuple) -> bool | None:
    """None unless every tensor in ``args`` is an ordinary CPU / CUDA tensor (then: whether
    one of them requires grad). One pass over the arguments: the eager hot path."""
    grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TYPES or not (a.is_cuda or a.is_cpu):
                return None
            grad = grad or a.requires_grad
    return grad


def _tracing() -> bool:
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def eager_ready(args: tuple) -> bool:
    """Nothing traces (no torch.compile, no dispatch mode: fake, functional or proxy
    tensors) and every tensor is an ordinary CPU / CUDA tensor: the dispatcher would take
    this call straight to the op's CPU / CUDA implementation."""
    return not _tracing() and _plain_call(args) is not None


def needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# --- declaration ---------------------------------------------------------------------------

_LIB = torch.library.Library(NAMESPACE, "DEF")


def _schema(reference: Callable[..., Any]) -> str:
    """``torch.library.infer_schema`` of the reference. It takes no optional outputs (torch
    2.13), so those are inferred as Tensor and marked optional afterwards."""
    sig = inspect.signature(reference, eval_str=True)
    ret = sig.return_annotation
    outs = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
    optional = [o is not torch.Tensor and torch.Tensor in typing.get_args(o) for o in outs]

    def prototype(*args):  # pragma: no cover - only its signature is read
        pass

    plain = tuple(torch.Tensor if opt else o for o, opt in zip(outs, optional))
    is_tuple = typing.get_origin(ret) is tuple
    prototype.__signature__ = sig.replace(return_annotation=tuple[plain] if is_tuple else plain[0])
    schema = torch.library.infer_schema(prototype, mutates_args=())
    if any(optional):
        args, _ = schema.rsplit(" -> ", 1)
        schema = args + " -> (" + ", ".join("Tensor?" if o else "Tensor" for o in optional) + ")"
    return schema


def _autograd_function(spec: OpSpec, run: Callable[[tuple], Any]) -> type:
    """``spec``'s autograd formula as a ``torch.autograd.Function`` whose forward is ``run``
    (the eager fast path's route when a gradient is needed)."""
    setup, backward = spec.autograd

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return run(args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{spec.name}_autograd"
    return Function


class Op:
    """The public callable of one op (``compile_norm.ops.<name>``).

    Eager calls on plain tensors check the arguments and run the first provider that
    accepts them, without the dispatcher (``registry.eager_ready``); everything else
    (torch.compile, export, fake or functional tensors, tensor subclasses) calls the torch op
    ``torch.ops.compile_norm.<name>``, which dispatches to the same providers.
    """

    def __init__(self, entry: OpEntry, overload: Any):
        spec = entry.spec
        self.spec, self.name, self.overload = spec, spec.name, overload
        self.__name__ = self.__qualname__ = spec.name
        self.__doc__ = spec.reference.__doc__
        self._entry = entry
        self._grad_fn = None if spec.autograd is None else _autograd_function(
            spec, lambda args: _run(entry, args))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _tracing():
            return self.overload(*args, **kwargs)  # record the torch op
        args = self.spec.bind(args, kwargs)
        grad = _plain_call(args)
        if grad is None:  # tensor subclasses, other devices: the dispatcher decides
            return self.overload(*args)
        self.spec.check(*args)
        if grad and torch.is_grad_enabled():
            if self._grad_fn is None:
                return self.overload(*args)  # torch's autograd says what it says for this op
            return self._grad_fn.apply(*args)
        return _run(self._entry, args)

    def __repr__(self) -> str:
        return f"<compile_norm op {self.name}>"


def declare(spec: OpSpec) -> Op:
    """Declare ``compile_norm::<spec.name>``; the reference becomes the ``native`` provider."""
    name = spec.name
    if name in _OPS:
        raise ValueError(f"compile_norm: op {name!r} declared twice")
    entry = OpEntry(spec)
    entry.providers[NATIVE] = Provider(NATIVE, spec.reference, rank=1 << 30)
    _OPS[name] = entry
    _rebuild(entry)

    def eager(*args: Any, **kwargs: Any) -> Any:
        # the dispatcher drops trailing arguments equal to their defaults: fill them back in
        args = spec.bind(args, kwargs)
        spec.check(*args)
        return _run(entry, args)

    def fake(*args: Any, **kwargs: Any) -> Any:
        args = spec.bind(args, kwargs)
        spec.check(*args)
        return spec.fake(*args)

    eager.__name__ = fake.__name__ = name
    _LIB.define(f"{name}{_schema(spec.reference)}")
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, eager, key)
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if spec.autograd is not None:
        setup, backward = spec.autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup, lib=_LIB)
    entry.op = Op(entry, overload(name))
    return entry.op
