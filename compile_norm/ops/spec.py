"""What a compile_norm op is: one declaration (``OpSpec``) that everything else derives from.

An op is a kind (norm, add + norm, quantization, norm + quantization, add + norm +
quantization, or the norm's backward), a quantization scheme where it has one, and an
annotated reference function: the specification of its math. Its name, its
``torch.library`` schema (``torch.library.infer_schema`` of the reference), the split of its
arguments into norm and scheme parts (kernels and passes use it), its choice family and the
relation to its sibling ops (the add variant of a norm, the norm + quant op of a scheme) all
come from that record, never from a second spelling.
"""

from __future__ import annotations

import enum
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from .quant import QuantScheme


class Kind(enum.Enum):
    NORM = "norm"
    ADD_NORM = "add_norm"
    QUANT = "quant"
    NORM_QUANT = "norm_quant"
    ADD_NORM_QUANT = "add_norm_quant"
    BACKWARD = "backward"
    GATED_NORM = "gated_norm"  # RMSNorm with a SiLU gate (ops/gated.py)
    GATED_NORM_QUANT = "gated_norm_quant"  # the gated norm, then quantization (ops/fused.py)
    # a norm of x, the residual add, a norm of the sum (Gemma's sandwich: ops/norm.py)
    NORM_ADD_NORM = "norm_add_norm"


RESIDUAL_KINDS = (Kind.ADD_NORM, Kind.ADD_NORM_QUANT, Kind.NORM_ADD_NORM)
GATED_KINDS = (Kind.GATED_NORM, Kind.GATED_NORM_QUANT)
# What the forward row kernel (kernels/triton_kernel.py) implements.
ROW_KERNEL_KINDS = (Kind.NORM, Kind.ADD_NORM, Kind.QUANT, Kind.NORM_QUANT, Kind.ADD_NORM_QUANT,
                    *GATED_KINDS, Kind.NORM_ADD_NORM)
# The plain RMSNorm family (weight_offset, variance_size): what the gemma and residual passes take.
NORM_KINDS = (Kind.NORM, Kind.ADD_NORM, Kind.NORM_QUANT, Kind.ADD_NORM_QUANT)
QUANT_KINDS = (Kind.QUANT, Kind.NORM_QUANT, Kind.ADD_NORM_QUANT, Kind.GATED_NORM_QUANT)

_BASE_NAME = {
    Kind.NORM: "rms_norm",
    Kind.ADD_NORM: "fused_add_rms_norm",
    Kind.QUANT: "quant",
    Kind.NORM_QUANT: "rms_norm",
    Kind.ADD_NORM_QUANT: "fused_add_rms_norm",
    Kind.BACKWARD: "rms_norm_backward",
    Kind.GATED_NORM: "rms_norm_gated",
    Kind.GATED_NORM_QUANT: "rms_norm_gated",
    Kind.NORM_ADD_NORM: "rms_norm_add_rms_norm",
}
# Choice families (lowerings/choice.py): the kernel-vs-generated table is kept per family.
_FAMILY = {
    Kind.NORM: "norm",
    Kind.ADD_NORM: "add_norm",
    Kind.QUANT: "quant",
    Kind.NORM_QUANT: "norm",
    Kind.ADD_NORM_QUANT: "add_norm",
    Kind.BACKWARD: "backward",
    Kind.GATED_NORM: "gated_norm",
    Kind.GATED_NORM_QUANT: "gated_norm",
    Kind.NORM_ADD_NORM: "norm_add_norm",
}


def op_name(kind: Kind, scheme: str | None = None) -> str:
    """The op's name: ``rms_norm``, ``fused_add_rms_norm_fp8_dynamic``, ``quant_int8_static``..."""
    base = _BASE_NAME[kind]
    return base if scheme is None else f"{base}_{scheme}"


class NormCall(NamedTuple):
    """An op's positional arguments split into what the norm and the scheme take.

    The gated norm (``GATED_KINDS``) has no weight offset or variance window (0.0 and None
    here) but a gate, its placement and the norm's group size (None: the whole row).
    ``NORM_ADD_NORM``: ``weight`` / ``eps`` / ``weight_offset`` are the norm of the sum's;
    ``x_norm`` is ``(weight, eps, weight_offset)`` of the norm x takes before the add."""

    x: Any
    residual: Any
    weight: Any
    eps: float
    qargs: tuple
    weight_offset: float
    variance_size: Any
    gate: Any = None
    norm_before_gate: bool = True
    norm_group: Any = None
    x_norm: Any = None


@dataclass(frozen=True, eq=False)
class OpSpec:
    """One op. ``reference`` is annotated; its signature is the op's signature.

    ``check(*args)`` raises a ValueError naming the bad argument; ``fake(*args)`` returns
    empty outputs of the right shape, dtype and strides; ``autograd`` is
    ``(setup_context, backward)`` in ``torch.library.register_autograd``'s form, or None.
    All three take the op's arguments positionally, every default filled in.
    """

    kind: Kind
    reference: Callable[..., Any]
    check: Callable[..., None]
    fake: Callable[..., Any]
    outputs: tuple[str, ...]
    scheme: QuantScheme | None = None
    autograd: tuple[Callable, Callable] | None = None

    @functools.cached_property
    def name(self) -> str:
        return op_name(self.kind, self.scheme.name if self.scheme else None)

    @property
    def scheme_name(self) -> str | None:
        return self.scheme.name if self.scheme else None

    @functools.cached_property
    def family(self) -> str:
        base = _FAMILY[self.kind]
        return base if self.scheme is None else f"{base}_{self.scheme.name}"

    @property
    def residual(self) -> bool:
        return self.kind in RESIDUAL_KINDS

    @property
    def normalizes(self) -> bool:
        """A plain RMSNorm-family op (not the gated norm, which has arguments of its own)."""
        return self.kind in NORM_KINDS

    @property
    def gated(self) -> bool:
        return self.kind in GATED_KINDS

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.reference)

    @functools.cached_property
    def defaults(self) -> tuple:
        """Every parameter's default (None where it has none), in order."""
        return tuple(
            None if p.default is inspect.Parameter.empty else p.default
            for p in self.signature.parameters.values()
        )

    @functools.cached_property
    def _positions(self) -> tuple[dict[str, int], frozenset[int]]:
        """(parameter index by name, indices of the parameters without a default)."""
        params = list(self.signature.parameters.values())
        return ({p.name: i for i, p in enumerate(params)},
                frozenset(i for i, p in enumerate(params) if p.default is inspect.Parameter.empty))

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """All arguments positionally, defaults filled in (how providers receive them).
        On the eager hot path: a keyword call costs a dict lookup per keyword."""
        n = len(self.defaults)
        if not kwargs and len(args) == n:
            return args
        if len(args) > n:
            raise TypeError(f"compile_norm.{self.name}: takes {n} arguments, got {len(args)}")
        values = list(args) + list(self.defaults[len(args):])
        index, required = self._positions
        for key, value in kwargs.items():
            i = index.get(key)
            if i is None:
                raise TypeError(f"compile_norm.{self.name}: unexpected argument {key!r}")
            if i < len(args):
                raise TypeError(f"compile_norm.{self.name}: argument {key!r} given twice")
            values[i] = value
        missing = [name for name, i in index.items()
                   if i in required and i >= len(args) and name not in kwargs]
        if missing:
            raise TypeError(f"compile_norm.{self.name}: missing argument {missing[0]!r}")
        return tuple(values)

    @functools.cached_property
    def _layout(self) -> tuple[int, int]:
        """(index of the first scheme argument, number of scheme arguments)."""
        n_scheme = len(self.scheme.parameters) if self.scheme else 0
        if self.kind == Kind.QUANT:
            return 1, n_scheme
        return (4 if self.residual or self.gated else 3), n_scheme

    def split(self, args: tuple) -> NormCall:
        """``args`` (positional, complete) as a ``NormCall``; not for the backward."""
        start, n = self._layout
        if self.kind == Kind.QUANT:
            return NormCall(args[0], None, None, 0.0, tuple(args[1:]), 0.0, None)
        if self.kind == Kind.NORM_ADD_NORM:
            # (x, residual, x_weight, x_eps, weight, eps, x_weight_offset, weight_offset)
            return NormCall(args[0], args[1], args[4], args[5], (), args[7], None,
                            x_norm=(args[2], args[3], args[6]))
        qargs, tail = tuple(args[start:start + n]), args[start + n:]
        if self.gated:  # (x, gate, weight, eps, <scheme>, norm_before_gate, group size)
            return NormCall(args[0], None, args[2], args[3], qargs, 0.0, None, args[1], *tail)
        residual = args[1] if self.residual else None
        return NormCall(args[0], residual, args[start - 2], args[start - 1], qargs, *tail)

    def join(self, call: NormCall) -> tuple:
        """The inverse of ``split``: this op's positional arguments for ``call``."""
        if self.kind == Kind.QUANT:
            return (call.x, *call.qargs)
        if self.kind == Kind.NORM_ADD_NORM:
            xw, x_eps, x_offset = call.x_norm
            return (call.x, call.residual, xw, x_eps, call.weight, call.eps, x_offset,
                    call.weight_offset)
        if self.gated:
            return (call.x, call.gate, call.weight, call.eps, *call.qargs, call.norm_before_gate,
                    call.norm_group)
        head = (call.x, call.residual) if self.residual else (call.x,)
        return (*head, call.weight, call.eps, *call.qargs, call.weight_offset, call.variance_size)

    @property
    def weight_index(self) -> int:
        if self.kind == Kind.NORM_ADD_NORM:
            return 4
        return 2 if self.residual or self.gated else 1

    def __repr__(self) -> str:
        return f"OpSpec({self.name})"
