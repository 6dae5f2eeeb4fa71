"""Which implementation the ``lower`` pass gives an op under ``lowering="auto"``.

``explain(op_name, fake_args)`` returns ``("generated", why)`` (inline the reference: Inductor
generates the fused code) or ``("kernel", why)`` (the Triton kernel, as a user-defined kernel
through ``compile_norm.kernels.library_ops``). Order of evidence:

1. Hard rules: not CUDA, kernel library unavailable, or the kernel rejects the arguments ->
   generated. A symbolic hidden size -> generated; so is a symbolic token count without batch
   invariance (with it, a dynamic-shape graph's choice is the shape class's, as for any count).
2. A measurement of the node's shape class on this device (card, torch, Triton): taken at
   compile time by ``lowerings/measure.py`` when none is on record (the ``measure`` option),
   kept in memory and in ``<inductor cache dir>/compile_norm/choice.json``. Where batch
   invariance forces the kernel (below), only the one-launch ops are measured, for their
   launch config; the backward and the two-pass ops have one config and are not.
3. Where nothing could be measured: the seed table ``KERNEL_WINS`` (H100 runs,
   benchmarks/RESULTS.md): kernel where it beat generated code clearly (>= 5%), generated
   everywhere else (ties go to generated: it can fuse with neighbours, a kernel cannot).

Batch invariance (the default): one choice per shape class for every token count, so the same
row gets the same code, and the same bits, whatever the number of rows.

The pass manager's cache key includes ``state_key()`` (the measured entries), and the sources
of this file are hashed with the package, so a change of either recompiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import threading
from typing import Any, Sequence

import torch

from ..options import inductor_has

GENERATED, KERNEL = "generated", "kernel"
DECODE_TOKENS = 256  # at or below: launch-latency bound (BENCHMARKS.md reports microseconds)
MID_TOKENS = 4096  # (256, 4096]: "mid"; a family without a "mid" entry follows its "bulk" one

# Families: "norm", "add_norm", "norm_<scheme>", "add_norm_<scheme>", "quant_<scheme>", "backward".
# Hidden classes: "pow2" (power of two >= 1024), "npow2" (other >= 1024), "small" (< 1024,
# e.g. per-head QK norm). Token classes: "decode" (T <= 256), "mid" (<= 4096), "bulk".
# Entries are (family, hidden class, token class); dtype class "16bit" (bf16 / fp16) only:
# fp32 activations were not measured and stay generated.
#
# Measured (benchmarks/RESULTS.md runs 6-8, H100, bf16, kernel time by CUDA-graph replay as a
# ratio to copy; kernel = the Triton kernel after the instruction cuts of run 7, generated =
# the op's reference inlined and compiled by Inductor, as lowering="generated" gives it):
#   norm_fp8_static      pow2 bulk: 0.91 vs 0.77 (8192x4096); npow2 bulk: 0.86 vs 0.76 (x5376)
#   norm_fp8_group       pow2 bulk: 0.91 vs 0.56;             npow2 bulk: 0.72 vs 0.57
#   norm_int8_dynamic    pow2 bulk: 0.88 vs 0.54;             npow2 bulk: 0.81 vs 0.43
#   add_norm_fp8_dynamic pow2 bulk: 1.01 vs 0.95 (the suite's HF code, run 8; the op alone
#                        compiled to 1.00: the kernel still wins in a model); npow2: 0.98 vs 0.93
#   norm, add_norm, Gemma: generated code equals or beats the kernel (0.96-1.01 vs 0.94-0.98)
# Mid token counts (run 9, 2048x2304): the plain norms' kernel beats generated code there
# (rms_norm 1.06 vs 0.98, Gemma 1.08 vs 0.99, fused add 1.39 vs 1.26), unlike at 8192x5376
# (0.98 vs 1.01); at 2048x4096 they tie (run 1: 0.99 vs 0.98, 1.20 vs 1.21).
# Decode (run 1, T <= 256, microseconds): group FP8 6.5 vs 7.8 and 7.3 vs 13.7 (kernel); the
# other families tie or favour generated code there.
# Extrapolated (same kernel path, not measured; a tuning run replaces them):
#   add_norm_<s> like norm_<s> (one more input read, same quantization code);
#   int8_static like fp8_static; int8_dynamic_asym / fp8_dynamic like int8_dynamic;
#   quant_fp8_group like norm_fp8_group (Inductor's per-group reshape is the slow part).
# Not in the table: the gated norm ("gated_norm", "gated_norm_<scheme>"), never timed against
# generated code yet: a compile-time measurement decides (generated code where none is taken).
MEASURED = "runs 6-8"
DECODE = "run 1"
MID = "run 9"
EXTRAPOLATED = "extrapolated"
BACKWARD = "issue 12 eager"
KERNEL_WINS: dict[tuple[str, str, str], str] = {
    ("norm", "npow2", "mid"): MID,
    ("add_norm", "npow2", "mid"): MID,
    ("norm_fp8_static", "pow2", "bulk"): MEASURED,
    ("norm_fp8_static", "npow2", "bulk"): MEASURED,
    ("norm_fp8_group", "pow2", "bulk"): MEASURED,
    ("norm_fp8_group", "npow2", "bulk"): MEASURED,
    ("norm_fp8_group", "pow2", "decode"): DECODE,
    ("norm_int8_dynamic", "pow2", "bulk"): MEASURED,
    ("norm_int8_dynamic", "npow2", "bulk"): MEASURED,
    ("add_norm_fp8_dynamic", "pow2", "bulk"): MEASURED,
    ("add_norm_fp8_dynamic", "npow2", "bulk"): MEASURED,
    ("add_norm_fp8_static", "pow2", "bulk"): EXTRAPOLATED,
    ("add_norm_fp8_static", "npow2", "bulk"): EXTRAPOLATED,
    ("add_norm_fp8_group", "pow2", "bulk"): EXTRAPOLATED,
    ("add_norm_fp8_group", "npow2", "bulk"): EXTRAPOLATED,
    ("add_norm_fp8_group", "pow2", "decode"): EXTRAPOLATED,
    ("add_norm_int8_dynamic", "pow2", "bulk"): EXTRAPOLATED,
    ("add_norm_int8_dynamic", "npow2", "bulk"): EXTRAPOLATED,
    ("norm_int8_static", "pow2", "bulk"): EXTRAPOLATED,
    ("norm_int8_static", "npow2", "bulk"): EXTRAPOLATED,
    ("add_norm_int8_static", "pow2", "bulk"): EXTRAPOLATED,
    ("norm_int8_dynamic_asym", "pow2", "bulk"): EXTRAPOLATED,
    ("norm_int8_dynamic_asym", "npow2", "bulk"): EXTRAPOLATED,
    ("add_norm_int8_dynamic_asym", "pow2", "bulk"): EXTRAPOLATED,
    ("norm_fp8_dynamic", "pow2", "bulk"): EXTRAPOLATED,
    ("norm_fp8_dynamic", "npow2", "bulk"): EXTRAPOLATED,
    ("quant_fp8_group", "pow2", "bulk"): EXTRAPOLATED,
    ("quant_fp8_group", "pow2", "decode"): EXTRAPOLATED,
    # rms_norm_backward (the dx / dweight / residual-gradient kernel against Inductor's code
    # for the inlined reference): H200, bf16, fwd+bwd at T >= 2048 (issue 12): the eager
    # kernels 0.57-0.73 of copy, compiled code 0.44-0.70; not measured as a lowering yet.
    ("backward", "pow2", "mid"): BACKWARD,
    ("backward", "pow2", "bulk"): BACKWARD,
    ("backward", "npow2", "mid"): BACKWARD,
    ("backward", "npow2", "bulk"): BACKWARD,
}


def family(op_name: str) -> str:
    """The op's family in the table (``OpSpec.family``)."""
    from ..ops import registry

    if op_name not in registry.ops():
        raise ValueError(f"compile_norm: op_name {op_name!r} is not a compile_norm op; known: "
                         f"{', '.join(sorted(registry.ops()))}")
    return registry.spec(op_name).family


def hidden_class(hidden: int) -> str:
    if hidden < 1024:
        return "small"
    return "pow2" if hidden & (hidden - 1) == 0 else "npow2"


def token_class(tokens: int) -> str:
    if tokens <= DECODE_TOKENS:
        return "decode"
    return "mid" if tokens <= MID_TOKENS else "bulk"


def dtype_class(dtype: torch.dtype) -> str:
    return "16bit" if dtype in (torch.bfloat16, torch.float16) else str(dtype).replace("torch.", "")


def _static_int(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        node = v.node
        return int(node.maybe_as_int()) if node.maybe_as_int() is not None else None
    return None


def _tokens(x: torch.Tensor) -> int | None:
    n = 1
    for d in x.shape[:-1]:
        d = _static_int(d)
        if d is None:
            return None
        n *= d
    return n


# --- measured entries (memory + disk) -------------------------------------------------------
#
# The file holds {device key: {shape class: entry}}; the device key names the GPU, the torch
# and Triton versions and the kernels' sources, so a measurement is only trusted on the card,
# stack and kernels it was made with.
# A shape class is (op, dtype, hidden size, token class, the other arguments' kinds); with
# batch invariance (the default) the token class is "any": one choice for every token count,
# measured at MEASURE_TOKENS["any"], so a row's bits never depend on how many rows share a call.

MEASURE_TOKENS = {"any": (16, 8192), "decode": (16,), "mid": (2048,), "bulk": (8192,)}
TIE = 0.97  # the kernel must be >= 3% faster (geometric mean over the tokens measured)

_LOCK = threading.Lock()
_MEASURED: dict[str, dict[str, dict]] | None = None


def cache_path() -> pathlib.Path:
    """``<inductor cache dir>/compile_norm/choice.json`` (COMPILE_NORM_CHOICE_CACHE overrides)."""
    override = os.environ.get("COMPILE_NORM_CHOICE_CACHE")
    if override:
        return pathlib.Path(override)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return pathlib.Path(cache_dir()) / "compile_norm" / "choice.json"


def device_key(device: torch.device | None = None) -> str:
    """The card and software a measurement holds for: torch, Triton and the kernels' sources
    (a changed kernel is measured again, not judged by its predecessor's times)."""
    from ..kernels import triton_backward, triton_ops
    from ..passes.cache_key import triton_version

    try:
        name = torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError):  # no driver (fake CUDA tensors on a CPU machine)
        name = "no CUDA device"
    kernels = f"{triton_ops.SOURCE[:12]}+{triton_backward.SOURCE[:12]}"
    return f"{name}|torch {torch.__version__}|triton {triton_version()}|kernels {kernels}"


def shaped_like(a: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``a`` has x's shape, judged without guarding a symbolic token count."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.dim() == x.dim() and all(statically_known_true(p == q) for p, q in zip(a.shape, x.shape))


def _arg_kind(a: Any, x: torch.Tensor) -> str:
    """What of an argument can change the speed: dtypes, shapes other than x's, flags, ints."""
    if isinstance(a, torch.Tensor):
        return f"{str(a.dtype).replace('torch.', '')}{'' if shaped_like(a, x) else list(a.shape)}"
    if a is None or isinstance(a, (bool, int)):
        return repr(a)
    return type(a).__name__  # a float's value (eps, an offset) does not change the kernel's speed


def shape_class(op_name: str, fake_args: Sequence[Any], batch_invariant: bool = True) -> str | None:
    """The key a measurement is kept under; None for a symbolic shape. Trailing arguments
    left at their defaults key as if given (a call and its FX node may spell them or not)."""
    from ..ops import registry

    fake_args = registry.spec(op_name).bind(tuple(fake_args), {})
    x = fake_args[0]
    hidden, tokens = _static_int(x.shape[-1]), _tokens(x)
    if hidden is None or (tokens is None and not batch_invariant):
        return None
    tclass = "any" if batch_invariant else token_class(tokens)
    rest = ",".join(_arg_kind(a, x) for a in fake_args[1:])
    return f"{op_name}|{str(x.dtype).replace('torch.', '')}|{hidden}|{tclass}|{rest}"


def _load() -> dict[str, dict[str, dict]]:
    global _MEASURED
    with _LOCK:
        if _MEASURED is None:
            try:
                data = json.loads(cache_path().read_text())
            except (OSError, ValueError):
                data = {}
            _MEASURED = {dev: {k: v for k, v in table.items()
                               if isinstance(v, dict) and v.get("choice") in (GENERATED, KERNEL)}
                         for dev, table in data.items() if isinstance(table, dict)}
        return _MEASURED


def measured(key: str, device: str) -> dict | None:
    return _load().get(device, {}).get(key)


def record(key: str, device: str, tokens: Sequence[int], generated_us: Sequence[float],
           kernel_us: Sequence[float], seconds: float = 0.0, config: list | None = None) -> str:
    """Store a measurement of both candidates at each token count; the kernel wins where its
    time is below TIE x generated code's (geometric mean), else generated (ties go to
    generated: it fuses with its neighbours). Written through to disk. Returns the choice."""
    ratios = [k / g for g, k in zip(generated_us, kernel_us)]
    ratio = statistics.geometric_mean(ratios)
    entry = dict(choice=KERNEL if ratio < TIE else GENERATED, tokens=list(tokens),
                 generated_us=[round(v, 3) for v in generated_us],
                 kernel_us=[round(v, 3) for v in kernel_us], seconds=round(seconds, 2))
    if config is not None:  # the kernel's fastest launch config (triton_ops.config_to_json)
        entry["config"] = config
    table = _load()
    with _LOCK:
        table.setdefault(device, {})[key] = entry
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return entry["choice"]


def reset_measured(forget_disk: bool = False) -> None:
    """Drop the in-memory entries (re-read from disk next time); optionally delete the file."""
    global _MEASURED
    with _LOCK:
        _MEASURED = None
        if forget_disk:
            try:
                cache_path().unlink()
            except OSError:
                pass


def state_key() -> str:
    """Hash of the measured entries: part of the pass manager's cache key."""
    return hashlib.sha256(json.dumps(_load(), sort_keys=True).encode()).hexdigest()[:16]


# --- the choice ---------------------------------------------------------------------------------


def explain(op_name: str, fake_args: Sequence[Any], batch_invariant: bool = True,
            measure: bool = False) -> tuple[str, str]:
    """(choice, why) between the Triton kernel and generated code for ``op_name`` called
    with positional ``fake_args`` (fake or real), as ``lowering="auto"`` decides it.
    ``batch_invariant``: one choice for every token count. ``measure``: time the candidates
    now where this shape class has no measurement on this device (lowerings/measure.py)."""
    fam = family(op_name)
    x = fake_args[0] if fake_args else None
    if not isinstance(x, torch.Tensor):
        return GENERATED, "x is not a tensor"
    if x.device.type != "cuda":
        return GENERATED, f"x is on {x.device.type}, the kernels run on CUDA"
    from ..kernels import library_ops

    if not library_ops.AVAILABLE:
        return GENERATED, library_ops.REASON
    if not library_ops.supports(op_name, *fake_args):
        return GENERATED, "the Triton kernel does not accept these arguments"
    key = shape_class(op_name, fake_args, batch_invariant)
    if key is None:
        return GENERATED, "symbolic shape: choices are per token class and hidden size"
    device = device_key(x.device)
    entry = measured(key, device)
    forced = batch_invariant and not inductor_has("batch_invariant")
    # Measure where the result can change what is lowered: the choice, or where the kernel is
    # forced its launch config; the backward and the two-pass ops have a single config.
    if entry is None and measure and not (forced and op_name not in _launch_configured()):
        from . import measure as measuring

        entry = measuring.measure_class(op_name, fake_args, key, device)
    if forced:
        return KERNEL, ("batch invariance: this torch's Inductor cannot fix its generated reductions' "
                        "configuration (no batch_invariant setting); the kernel is batch-invariant")
    if entry is not None:
        return entry["choice"], (f"measured at T={entry['tokens']}: generated {entry['generated_us']} us, "
                                 f"kernel {entry['kernel_us']} us")
    if dtype_class(x.dtype) != "16bit":
        return GENERATED, f"{x.dtype} activations: not in the table"
    tclass = key.split("|")[3]
    if tclass == "any":
        tclass = "bulk"  # one choice for every token count: the bandwidth-bound one
    hidden = _static_int(x.shape[-1])
    table_key = (fam, hidden_class(hidden), tclass)
    source = _table(table_key)
    if source is not None:
        return KERNEL, f"table {table_key} ({source})"
    return GENERATED, f"table {table_key}: generated code wins or ties"


def _launch_configured() -> dict:
    """The ops a measurement can pick a launch config for (one launch of the row kernel)."""
    from ..kernels import triton_ops

    return triton_ops.FUNCTIONS


def kernel_config(op_name: str, fake_args: Sequence[Any], batch_invariant: bool = True):
    """The launch config measured fastest for this call's shape class on its device, or None
    (the kernel's default)."""
    key = shape_class(op_name, fake_args, batch_invariant)
    entry = None if key is None else measured(key, device_key(fake_args[0].device))
    if entry is None or "config" not in entry:
        return None
    from ..kernels import triton_ops

    return triton_ops.config_from_json(entry["config"])


def _table(key: tuple[str, str, str]) -> str | None:
    """The source of ``KERNEL_WINS``' kernel entry for ``key``; a family without a "mid"
    entry follows its "bulk" one."""
    source = KERNEL_WINS.get(key)
    if source is None and key[2] == "mid":
        source = KERNEL_WINS.get((key[0], key[1], "bulk"))
    return source


def choose(op_name: str, fake_args: Sequence[Any], batch_invariant: bool = True) -> str:
    """``"generated"`` or ``"kernel"`` for ``op_name`` on these (fake) arguments."""
    return explain(op_name, fake_args, batch_invariant)[0]


# --- the lowering of one node: the one room where it is decided ---------------------------------

CALL = "call"  # keep the node: a call of the op, run by another provider at run time


def kernel_provider(op_name: str, fake_args: Sequence[Any]) -> str | None:
    """The non-native provider that would run this call in eager (the registry's priority),
    judged from fake tensors; None where only the reference would."""
    from ..ops import registry

    for provider in registry.chain(op_name):
        if provider.name == registry.NATIVE:
            return None
        try:
            if provider.supports(*fake_args):
                return provider.name
        except Exception:  # a supports() that cannot judge fake tensors: do not pick it
            continue
    return None


def lowering_for(op_name: str, fake_args: Sequence[Any], mode: str, batch_invariant: bool = True,
                 measure: bool = False) -> tuple[str, str]:
    """``(implementation, why)`` of one IR node under the ``lowering`` option ``mode``:
    ``GENERATED`` (inline the reference), ``KERNEL`` (the Triton kernel as a user-defined
    kernel) or ``CALL`` (keep the op for another provider). A pure function of the node's
    fake arguments, the provider priority and the measured entries (``measure``: take a
    missing measurement now, see ``explain``)."""
    from ..kernels.triton_ops import PROVIDER as TRITON  # whose kernel Inductor can see

    if mode == GENERATED:
        return GENERATED, "lowering='generated'"
    provider = kernel_provider(op_name, fake_args)
    if provider is None:
        return GENERATED, "no kernel provider accepts these arguments"
    if mode == "auto":
        if provider != TRITON:  # the table knows only the Triton kernel
            return GENERATED, f"provider {provider!r} is not in the table"
        return explain(op_name, fake_args, batch_invariant, measure)
    if provider == TRITON:
        return KERNEL, "lowering='kernel'"
    return CALL, f"kept as a call to kernel {provider!r}"
