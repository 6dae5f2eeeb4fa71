"""Compile options of the ``compile_norm`` backend, parsed from ``torch.compile(options=...)``.

Keys (all optional):

- ``passes``: names of the graph passes to run, a subset of ``PASS_ORDER`` (always run in that
  order; ``lower`` runs whenever the backend runs, because IR nodes must become code).
- ``quant_fusion``: fuse norm + quantization (the ``quant`` pass); default True.
- ``lowering``: ``"auto"`` (default: per node, the Triton kernel where the measured table of
  ``compile_norm.lowerings.choice`` says it is faster than generated code, generated code
  everywhere else and always off CUDA), ``"generated"`` (inline each op's reference so
  Inductor generates one fused kernel) or ``"kernel"`` (the op's registered kernel wherever
  one accepts the node: the Triton kernel as a user-defined kernel, others as a call).
- ``strict``: a pass that fails raises instead of warning and leaving the graph unfused.
- ``providers``: provider priority (as for ``compile_norm.set_priority``) applied while compiling.
- ``measure``: under ``lowering="auto"`` on CUDA, time the candidates of a node's shape class
  once at compile time (``lowerings/measure.py``; cached on disk per device and versions)
  instead of trusting the seed table; default True.
- every other key that is an Inductor config name (``torch._inductor.config``) is passed through
  to ``compile_fx`` as a config patch, e.g. ``{"max_autotune": True}``.

Numerics: compiled code gives eager's bits by default.

- ``emulate_precision_casts`` (an Inductor setting the backend turns on unless the options
  name it): round where eager rounds, e.g. the norm's cast to bf16 before the weight multiply.
  ``False`` trades that for Inductor's fused rounding.
- ``batch_invariant`` (default True): a row's bits never depend on how many rows share the
  call. The kernel choice ignores the token count; Inductor's own ``batch_invariant`` setting
  is turned on where this torch has it (it fixes the generated reductions' configuration),
  and where it has not, the Triton kernel (batch-invariant by construction) is chosen wherever
  it takes the call. ``False`` allows choices per token count.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

PASS_ORDER = ("canonicalize", "gemma", "gated", "residual", "quant", "sandwich", "lower")
LOWERING_MODES = ("generated", "kernel", "auto")
_OWN_KEYS = ("passes", "quant_fusion", "lowering", "strict", "providers", "measure", "batch_invariant")
NUMERICS_DEFAULTS = {"emulate_precision_casts": True}  # Inductor settings, unless the options name them


def _freeze(value: Any) -> Any:
    """A hashable, repr-stable copy of an option value (for the pass cache key)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_freeze(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items)
    return value


@dataclass(frozen=True)
class CompileOptions:
    passes: tuple[str, ...] = PASS_ORDER
    quant_fusion: bool = True
    lowering: str = "auto"
    strict: bool = False
    providers: Any = None  # frozen priority spec, or None (leave the current priority)
    measure: bool = True
    batch_invariant: bool = True
    inductor: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def enabled(self, name: str) -> bool:
        if name == "quant" and not self.quant_fusion:
            return False
        return name == "lower" or name in self.passes

    @property
    def inductor_config(self) -> dict[str, Any]:
        """The Inductor config patches: ``NUMERICS_DEFAULTS`` and ``batch_invariant`` where
        this torch has the setting, then the user's other Inductor settings."""
        known = _inductor_config_keys()
        ours = {**NUMERICS_DEFAULTS, "batch_invariant": self.batch_invariant}
        return {**{k: v for k, v in ours.items() if k in known}, **dict(self.inductor)}

    def cache_key(self) -> str:
        return repr(self)


@functools.lru_cache(maxsize=1)
def inductor_has(name: str) -> bool:
    """Whether this torch's Inductor has the config setting ``name``."""
    return name in _inductor_config_keys()


def _inductor_config_keys() -> frozenset[str]:
    from torch._inductor import config

    return frozenset(config._config.keys()) if hasattr(config, "_config") else frozenset(dir(config))


def parse_options(options: Mapping[str, Any] | CompileOptions | None) -> CompileOptions:
    """Validate ``options`` (a dict as given to ``torch.compile``) into ``CompileOptions``."""
    if options is None:
        return CompileOptions()
    if isinstance(options, CompileOptions):
        return options
    if not isinstance(options, Mapping):
        raise ValueError(f"compile_norm: options must be a dict, got {type(options).__name__}")
    own = {k: v for k, v in options.items() if k in _OWN_KEYS}
    rest = {k: v for k, v in options.items() if k not in _OWN_KEYS}
    known = _inductor_config_keys()
    unknown = sorted(str(k) for k in rest if k not in known)
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, (*_OWN_KEYS, *known), n=1)]
        raise ValueError(
            f"compile_norm: unknown option(s) {', '.join(map(repr, unknown))}; compile_norm "
            f"options are {', '.join(_OWN_KEYS)}, and Inductor config names pass through"
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        )
    passes = own.get("passes", PASS_ORDER)
    if isinstance(passes, str) or not isinstance(passes, (list, tuple)) or not all(isinstance(p, str) for p in passes):
        raise ValueError(f"compile_norm: option 'passes' must be a list of pass names (of "
                         f"{list(PASS_ORDER)}), got {passes!r}")
    bad = [p for p in passes if p not in PASS_ORDER]
    if bad:
        raise ValueError(
            f"compile_norm: option 'passes' has unknown pass(es) {bad}; known: {list(PASS_ORDER)}"
        )
    lowering = own.get("lowering", "auto")
    if lowering not in LOWERING_MODES:
        raise ValueError(
            f"compile_norm: option 'lowering' must be one of {list(LOWERING_MODES)}, got {lowering!r}"
        )
    for key in ("quant_fusion", "strict", "measure", "batch_invariant"):
        if key in own and not isinstance(own[key], bool):
            raise ValueError(f"compile_norm: option {key!r} must be a bool (True or False), got {own[key]!r}")
    providers = own.get("providers")
    if providers is not None and not isinstance(providers, (str, Mapping, list, tuple)):
        raise ValueError(
            "compile_norm: option 'providers' must be a list of provider names, a {op: [names]} "
            f"dict or a spec string, got {type(providers).__name__}"
        )
    if providers is not None:
        from .ops import registry

        registry.check_priority(providers, "option 'providers'")
    return CompileOptions(
        passes=tuple(p for p in PASS_ORDER if p in passes),
        quant_fusion=own.get("quant_fusion", True),
        lowering=lowering,
        strict=own.get("strict", False),
        measure=own.get("measure", True),
        batch_invariant=own.get("batch_invariant", True),
        providers=_freeze(providers),
        inductor=tuple(sorted(rest.items())),
    )


def thaw_providers(frozen: Any) -> Any:
    """``CompileOptions.providers`` back into what ``registry.set_priority`` accepts."""
    if frozen is None or isinstance(frozen, str):
        return frozen
    if frozen and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], tuple) for p in frozen):
        return {op: list(names) for op, names in frozen}
    return list(frozen)
