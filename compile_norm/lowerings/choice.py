"""Which implementation the ``lower`` pass gives an op under ``lowering="auto"``.

``choose(op_name, fake_args)`` returns ``"generated"`` (inline the reference: Inductor
generates the fused code) or ``"kernel"`` (the Triton kernel, as a user-defined kernel through
``compile_norm.kernels.library_ops``). Order of evidence:

1. Hard rules: not CUDA, kernel library unavailable, or the kernel rejects the arguments ->
   generated. Symbolic hidden size -> generated. A symbolic token count (a dynamic-shape
   graph serves every count) -> the kernel only where the table picks it at every token
   class, else generated; measured entries (per exact count) do not apply.
2. Measured entries (``record`` / ``benchmarks/suite.py --tune``), exact (op, dtype, H, T),
   in memory and in ``<inductor cache dir>/compile_norm/choice.json``.
3. The seed table ``KERNEL_WINS`` (H100 runs, benchmarks/RESULTS.md): kernel where it beat
   generated code clearly (>= 5%), generated everywhere else (ties go to generated: it can
   fuse with neighbours, a kernel cannot).

The pass manager's cache key includes ``state_key()`` (the measured entries), and the sources
of this file are hashed with the package, so a change of either recompiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading
from typing import Any, Sequence

import torch

GENERATED, KERNEL = "generated", "kernel"
DECODE_TOKENS = 256  # at or below: launch-latency bound (BENCHMARKS.md reports microseconds)
MID_TOKENS = 4096  # (256, 4096]: "mid"; a family without a "mid" entry follows its "bulk" one

# Families: "norm", "add_norm", "norm_<scheme>", "add_norm_<scheme>", "quant_<scheme>".
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
MEASURED = "runs 6-8"
DECODE = "run 1"
MID = "run 9"
EXTRAPOLATED = "extrapolated"
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

_LOCK = threading.Lock()
_MEASURED: dict[str, dict] | None = None


def cache_path() -> pathlib.Path:
    """``<inductor cache dir>/compile_norm/choice.json`` (COMPILE_NORM_CHOICE_CACHE overrides)."""
    override = os.environ.get("COMPILE_NORM_CHOICE_CACHE")
    if override:
        return pathlib.Path(override)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return pathlib.Path(cache_dir()) / "compile_norm" / "choice.json"


def measured_key(op_name: str, dtype: torch.dtype, hidden: int, tokens: int) -> str:
    return f"{op_name}|{str(dtype).replace('torch.', '')}|{hidden}|{tokens}"


def _load() -> dict[str, dict]:
    global _MEASURED
    with _LOCK:
        if _MEASURED is None:
            try:
                data = json.loads(cache_path().read_text())
                _MEASURED = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("choice") in (GENERATED, KERNEL)}
            except (OSError, ValueError):
                _MEASURED = {}
        return _MEASURED


def record(op_name: str, dtype: torch.dtype, hidden: int, tokens: int, generated_us: float, kernel_us: float) -> str:
    """Store a measurement (both candidates' kernel time); the faster one wins, ties (< 3%)
    go to generated. Written through to the disk cache. Returns the choice."""
    choice = KERNEL if kernel_us < 0.97 * generated_us else GENERATED
    entry = dict(choice=choice, generated_us=round(generated_us, 3), kernel_us=round(kernel_us, 3))
    table = _load()
    with _LOCK:
        table[measured_key(op_name, dtype, hidden, tokens)] = entry
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return choice


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


def explain(op_name: str, fake_args: Sequence[Any]) -> tuple[str, str]:
    """(choice, why) between the Triton kernel and generated code for ``op_name`` called
    with positional ``fake_args`` (fake or real), as ``lowering="auto"`` decides it."""
    if op_name == "rms_norm_backward":  # its kernel is eager only (no library op, no table)
        return GENERATED, "the backward kernel runs in eager only"
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
    hidden = _static_int(x.shape[-1])
    if hidden is None:
        return GENERATED, "symbolic hidden size: the table is per hidden size"
    tokens = _tokens(x)
    if tokens is not None:
        entry = _load().get(measured_key(op_name, x.dtype, hidden, tokens))
        if entry is not None:
            return entry["choice"], f"measured: generated {entry['generated_us']} us, kernel {entry['kernel_us']} us"
    if dtype_class(x.dtype) != "16bit":
        return GENERATED, f"{x.dtype} activations: not in the table"
    if tokens is None:  # one graph for every token count: the kernel only if it wins at all
        keys = [(fam, hidden_class(hidden), tc) for tc in ("decode", "mid", "bulk")]
        if all(_table(key) for key in keys):
            return KERNEL, f"symbolic token count: table {keys[0][:2]} picks the kernel at every token class"
        return GENERATED, f"symbolic token count: table {keys[0][:2]} does not pick the kernel at every token class"
    key = (fam, hidden_class(hidden), token_class(tokens))
    source = _table(key)
    if source is not None:
        return KERNEL, f"table {key} ({source})"
    return GENERATED, f"table {key}: generated code wins or ties"


def _table(key: tuple[str, str, str]) -> str | None:
    """The source of ``KERNEL_WINS``' kernel entry for ``key``; a family without a "mid"
    entry follows its "bulk" one."""
    source = KERNEL_WINS.get(key)
    if source is None and key[2] == "mid":
        source = KERNEL_WINS.get((key[0], key[1], "bulk"))
    return source


def choose(op_name: str, fake_args: Sequence[Any]) -> str:
    """``"generated"`` or ``"kernel"`` for ``op_name`` on these (fake) arguments."""
    return explain(op_name, fake_args)[0]


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


def lowering_for(op_name: str, fake_args: Sequence[Any], mode: str) -> tuple[str, str]:
    """``(implementation, why)`` of one IR node under the ``lowering`` option ``mode``:
    ``GENERATED`` (inline the reference), ``KERNEL`` (the Triton kernel as a user-defined
    kernel) or ``CALL`` (keep the op for another provider). A pure function of the node's
    fake arguments, the provider priority and the measured entries."""
    from ..kernels.triton_ops import PROVIDER as TRITON  # whose kernel Inductor can see

    if mode == GENERATED:
        return GENERATED, "lowering='generated'"
    provider = kernel_provider(op_name, fake_args)
    if provider is None:
        return GENERATED, "no kernel provider accepts these arguments"
    if mode == "auto":
        if provider != TRITON:  # the table knows only the Triton kernel
            return GENERATED, f"provider {provider!r} is not in the table"
        return explain(op_name, fake_args)
    if provider == TRITON:
        return KERNEL, "lowering='kernel'"
    return CALL, f"kept as a call to kernel {provider!r}"
