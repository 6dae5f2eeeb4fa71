"""Op declaration, kernel providers, priorities and eager dispatch.

Every compile_norm op is a ``torch.library`` operator (``Library.define`` + per-device
``impl``, ``register_fake``, torch's generated autograd) declared here from its reference
function. Its eager implementation asks the registry for the first provider (in the op's
priority order) whose static ``supported`` flag and per-call ``supports(*args, **kwargs)``
both hold. ``native`` (the reference) is registered with every op, sits last, and accepts
everything.

Priority order, most specific first:
  1. a scoped override (``with providers_priority(...)``), private to the thread/task;
  2. a process-wide setting (``set_priority``);
  3. the ``COMPILE_NORM_PROVIDERS`` environment variable, read at import:
     ``"triton,native"`` for every op or ``"rms_norm=native;*=triton,native"`` per op;
  4. each provider's registration ``rank`` (lower first).
Names that are not registered for an op are ignored. A list that names ``native`` ends there
(``["native"]`` forces the reference); otherwise providers left out of the list keep their
default order after the listed ones, with ``native`` always last.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

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
    name: str
    reference: Callable[..., Any]
    custom_op: Any = None
    providers: dict[str, Provider] = field(default_factory=dict)
    chain: tuple[Provider, ...] = ()  # supported providers in default priority order


_OPS: dict[str, OpEntry] = {}
_GLOBAL_PRIORITY: dict[str, tuple[str, ...]] = {}
_SCOPED_PRIORITY: contextvars.ContextVar[Mapping[str, tuple[str, ...]] | None] = (
    contextvars.ContextVar("compile_norm_scoped_priority", default=None)
)
# Bumped on every change of providers or priorities: cached chains and graph-pass cache keys
# depend on it.
_VERSION = [0]


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


def _bump() -> None:
    _VERSION[0] += 1
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


def _run(entry: OpEntry, args: tuple, kwargs: dict) -> Any:
    providers = entry.chain if _SCOPED_PRIORITY.get() is None else chain(entry.name)
    for provider in providers:
        if provider.supports(*args, **kwargs):
            return provider.fn(*args, **kwargs)
    raise AssertionError("unreachable: native accepts every call")  # pragma: no cover


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` with the first provider that accepts these arguments (the eager hot path).

    Arguments are not validated here; the op itself (``torch.ops.compile_norm.*``) does that.
    """
    return _run(_OPS[op], args, kwargs)


def normalize_call(op: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments as the dispatcher hands them to providers: positional, defaults filled in."""
    schema = _entry(op).custom_op._opoverload._schema
    given = dict(zip((a.name for a in schema.arguments), args))
    given.update(kwargs)
    positional, keyword = [], {}
    for arg in schema.arguments:
        if arg.name in given:
            value = given[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            raise TypeError(f"compile_norm.{op}: missing argument {arg.name!r}")
        if arg.kwarg_only:
            keyword[arg.name] = value
        else:
            positional.append(value)
    return tuple(positional), keyword


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
    _bump()


def unregister_provider(op: str, name: str) -> None:
    entry = _entry(op)
    if name == NATIVE:
        raise ValueError("compile_norm: the 'native' provider cannot be removed")
    entry.providers.pop(name, None)
    _bump()


def providers(op: str) -> dict[str, Provider]:
    """Every provider registered for ``op``, supported here or not."""
    return dict(_entry(op).providers)


def unsupported_reasons(op: str) -> dict[str, str]:
    """Providers of ``op`` that cannot run in this process, with the reason for each."""
    return {n: p.reason for n, p in _entry(op).providers.items() if not p.supported}


def _normalize(priority: Mapping[str, Iterable[str]] | Iterable[str]) -> dict[str, tuple[str, ...]]:
    if isinstance(priority, str):
        return _parse_priority_spec(priority)
    if isinstance(priority, Mapping):
        table = {op: tuple(names) for op, names in priority.items()}
    else:
        table = {"*": tuple(priority)}
    for op in table:
        if op != "*":
            _entry(op)
    return table


def set_priority(priority: Mapping[str, Iterable[str]] | Iterable[str] | str | None) -> None:
    """Set the process-wide provider priority.

    ``priority`` is a list of provider names for every op, a mapping ``{op: [names]}``
    (``"*"`` for the rest), a spec string as in ``COMPILE_NORM_PROVIDERS``, or None to reset.
    """
    _GLOBAL_PRIORITY.clear()
    if priority is not None:
        _GLOBAL_PRIORITY.update(_normalize(priority))
    _bump()


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
    """Everything about provider choice that can change a compiled graph (for cache keys)."""
    scoped = _SCOPED_PRIORITY.get() or {}
    return (
        tuple(sorted(scoped.items())),
        tuple(
            (op, tuple((p.name, p.source) for p in entry.chain)) for op, entry in sorted(_OPS.items())
        ),
    )


def ops() -> dict[str, OpEntry]:
    return dict(_OPS)


_LIB = torch.library.Library(NAMESPACE, "DEF")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def _any_requires_grad(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# nn.Parameter (model weights) is a subclass without dispatch behaviour: plain for the dispatcher
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_tensors(args: tuple) -> bool:
    """Only ordinary CPU / CUDA tensors (or Parameters) and no dispatch mode (no fake / proxy
    tracing): the dispatcher would take these straight to the CPU / CUDA kernel."""
    if torch._C._len_torch_dispatch_stack():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and not (type(a) in _PLAIN_TYPES and (a.is_cuda or a.is_cpu)):
            return False
    return True


class _OpHandle:
    """What ``declare_op`` returns: the op's overload and ``register_autograd``.

    The op's Autograd kernel: with grad needed it is torch's generated autograd.Function
    (what ``torch.library.register_autograd`` installs); without, on plain CPU / CUDA
    tensors it runs the eager implementation directly, skipping torch's Python layers
    (no-grad wrapper + redispatch: ~20 us per call on an H100 host). Anything else
    (fake / functional tensors, dispatch modes, other devices) redispatches as usual.
    """

    def __init__(self, qualname: str, overload: Any, eager: Callable[..., Any]):
        from torch._library import autograd as _lib_autograd

        self.qualname = qualname
        self._opoverload = overload
        self._info = _lib_autograd.Info(None, None)  # filled by register_autograd
        slow = _lib_autograd.make_autograd_impl(overload, self._info)

        def autograd_kernel(keyset: Any, *args: Any) -> Any:
            if torch.is_grad_enabled() and _any_requires_grad(args):
                return slow(keyset, *args)
            if _plain_tensors(args):
                return eager(*args)
            with torch._C._AutoDispatchBelowAutograd():
                return overload.redispatch(keyset & _AFTER_AUTOGRAD, *args)

        _LIB.impl(overload._opname if hasattr(overload, "_opname") else qualname.split("::")[1],
                  autograd_kernel, "Autograd", with_keyset=True)

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None):
        self._info._backward_fn = backward
        self._info._setup_context_fn = setup_context

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._opoverload(*args, **kwargs)


def declare_op(
    name: str,
    reference: Callable[..., Any],
    *,
    schema: str,
    fake: Callable[..., Any],
    check: Callable[..., None],
) -> Any:
    """Declare ``compile_norm::name`` from its reference function.

    ``check`` validates arguments (raising ValueError naming the argument) and runs before
    both the fake implementation (tracing) and eager dispatch. The reference is registered as
    the ``native`` provider.
    """
    if name in _OPS:
        raise ValueError(f"compile_norm: op {name!r} declared twice")
    entry = OpEntry(name=name, reference=reference)
    entry.providers[NATIVE] = Provider(NATIVE, reference, rank=1 << 30)
    _OPS[name] = entry
    _rebuild(entry)

    # The dispatcher drops trailing arguments equal to their defaults; providers (and
    # which_provider) see every argument positionally, so fill them back in.
    defaults: list[tuple] = []  # every argument's default (set once the schema is parsed)

    def eager(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args, kwargs = normalize_call(name, args, kwargs)
        elif len(args) < len(defaults[0]):
            args = args + defaults[0][len(args):]
        check(*args, **kwargs)
        return _run(entry, args, kwargs)

    def fake_impl(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return fake(*args, **kwargs)

    eager.__name__ = fake_impl.__name__ = name
    eager.__doc__ = reference.__doc__
    # torch.library.Library define/impl rather than torch.library.custom_op: the same
    # dispatcher entries (per-device eager kernel, fake, torch's generated autograd) without
    # custom_op's per-call Python layers (dynamo-disable wrapper, aliasing check, no-grad
    # redispatch), which cost 20-30 us per eager call on an H100 host.
    _LIB.define(f"{name}{schema}")
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, eager, key)
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake_impl, lib=_LIB)
    op = _OpHandle(qualname, getattr(getattr(torch.ops, NAMESPACE), name).default, eager)
    entry.custom_op = op
    arguments = op._opoverload._schema.arguments
    defaults.append(tuple(a.default_value if a.has_default_value() else None for a in arguments))
    return op
