"""The Triton provider ("triton") of every forward op: one kernel, one launch plan per call.

Every eager call is one launch of ``triton_kernel.norm_quant_kernel`` (none for zero tokens).
``prepare(spec, args)`` derives the launch from the op's spec: outputs allocated by the op's
fake (exactly its layout and dtype), the rows of x and the residual, the scheme's
``KernelQuant``, the launch configuration and the constexprs. The eager provider launches it
(``run``); ``library_ops`` launches the same plan through ``wrap_triton``.

Tolerances against the reference (what tests/test_kernels*.py assert; derivation in
compile_norm/kernels/checking.py): ``residual_out`` is exact; ``out`` within 1 ulp of x.dtype,
or 2 ulps when a 16-bit weight is applied Llama-style (``round(round(y) * w)``: the fp32 sum
of squares is reduced in another order, so ``rstd`` may differ in its last bits and flip
the first rounding), at most 1% of elements differing; fp32 x: rtol 1e-5. Scales follow
``out``'s relative bound; FP8 codes within one step; INT8 within
``1 + ceil(2 * eps_out * |q|)``. Quant-only ops match bit for bit.

Where the reference is device dependent the kernel follows the device it runs on: on CUDA
``tensor / python_number`` is ATen's multiply by the fp32 reciprocal, on CPU (interpreter)
a true division.

supports rules (every op): x on CUDA (on CPU only under TRITON_INTERPRET=1), x float16,
bfloat16 or float32 (float64 goes to native), 1 <= hidden <= 65536, weight (if any)
float16/bfloat16/float32 on the device (any mix with x.dtype is reproduced exactly, as is
``variance_size``); fp8_group: group_size a power of two. The gated norm: its group size
(gate before the norm) a power of two, and equal to the scheme's group where both have one
(the tiles hold one kind of group); the gate is read like a residual. Inputs whose last dim
is not contiguous are copied first (an extra copy, still correct); so are inputs whose
leading dims cannot be flattened into one row stride (e.g. transposed leading dims).
Large hidden sizes keep the whole row in registers: up to 16K elements per program without
spills; 65536 in fp32 spills (correct, slower). Non-power-of-two rows are split into up to
three power-of-two tiles (``column_tiles``) rather than padded.

Launch: one program per block of ``block_m`` rows, or, with ``LaunchConfig.programs_per_sm
> 0``, a persistent grid of at most SM count * programs_per_sm programs that loop over row
blocks and prefetch the next one (same numerics, bit for bit). It is off
(``launch_config`` returns 0): on the H100 it lost everywhere (run 7 in
benchmarks/RESULTS.md: two row blocks in registers cost more occupancy than the prefetch
hides); a compiled call takes it where the compile-time measurement found it faster on the
card (``few_configs``), and ``benchmarks/launch_sweep.py`` keeps trying it. The eager launch
route is described above ``specialization_key``.
Measured on H100 (torch 2.11, Triton 3.6, bf16, CUDA-graph replay, ratio to a copy of the
same element count; RESULTS.md run 9), 8192x5376: rms_norm 0.98, add_rms_norm 1.03,
add+FP8 dynamic 1.00, rms+FP8 static 0.88, rms+FP8 group 0.77, rms+INT8 dynamic 0.87;
8192x4096: 0.98, 1.04, 1.02, 0.90, 0.91, 0.90; 16384x4096: 0.99, 1.02, 1.01, 0.94, 0.95, 0.95.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import itertools
import os
import pathlib
from typing import Any, Iterator, NamedTuple

import torch

from ..ops import registry
from ..ops.gated import out_dtype as gated_out_dtype
from ..ops.quant import KernelQuant
from ..ops.spec import ROW_KERNEL_KINDS, Kind, NormCall, OpSpec
from .quant_modes import AMAX_MODES, QUANT_MODES

PROVIDER = "triton"
RANK = 10
MAX_HIDDEN = 65536

def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


triton = None
K = None
_IMPORT_ERROR = ""
# Import triton only where it can run: CPU-only users don't pay its import time.
if torch.cuda.is_available() or _interpret_requested():
    try:
        import triton

        from . import triton_kernel as K
    except Exception as e:  # ImportError, or a broken triton install
        triton, K = None, None
        _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


def _interpreting() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return _interpret_requested()  # pragma: no cover


INTERPRET = _interpreting()


def _availability() -> tuple[bool, str]:
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if INTERPRET:
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


SUPPORTED, REASON = _availability()
# Kernel sources: their change must change every cache key that depends on provider choice.
_HERE = pathlib.Path(__file__).parent
SOURCE = hashlib.sha256(
    b"".join((_HERE / f).read_bytes() for f in ("triton_kernel.py", "quant_modes.py", "triton_ops.py"))
).hexdigest()

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_E8M0 = torch.float8_e8m0fnu  # MX scales (stored by the kernel as their uint8 codes)


def _recip32(c: float) -> float:
    """fp32 ``1 / c`` (correctly rounded), exactly representable as the Python float."""
    return torch.tensor(1.0, dtype=torch.float32).div(c).item()


# ATen (CUDA) divides by a Python number as a multiply by the fp32 reciprocal.
_FP8_RECIP = _recip32(448.0)
_INT8_RECIP = _recip32(127.0)
_U8_RECIP = _recip32(255.0)


# --- per-call checks (cheap attribute tests only) ------------------------------------------

if INTERPRET:

    def _on_device(t: torch.Tensor) -> bool:
        return t.is_cpu

else:

    def _on_device(t: torch.Tensor) -> bool:
        return t.is_cuda


def _x_ok(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and _on_device(x)
        and x.dtype in _DTYPES
        and x.dim() >= 1
        and 0 < x.shape[-1] <= MAX_HIDDEN
    )


def _norm_ok(x: Any, weight: Any, variance_size: Any) -> bool:
    if not _x_ok(x):
        return False
    if weight is not None and not (_on_device(weight) and weight.dtype in _DTYPES):
        return False
    return variance_size is None or 1 <= variance_size <= x.shape[-1]


# --- launch ---------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class LaunchConfig(NamedTuple):
    block_m: int  # rows per program
    tiles: tuple  # ((NG0, G0), (NG1, G1), (NG2, G2)): column tiles, NG = 0 for none
    num_warps: int
    # 0: one program per row block. > 0: persistent, at most SM count * programs_per_sm
    # programs, each looping over row blocks and prefetching the next one (PERSISTENT).
    programs_per_sm: int = 0
    # The weight (gate, static scale) read with x (EARLY_LOADS) or after the reduction;
    # None: ``_early_loads`` decides (early unless persistent). The bits are the same either way.
    early_loads: bool | None = None


# Programs per "SM" under the interpreter: few, so that the persistent loop runs.
_INTERPRET_SMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(dev_index: int) -> int:
    return torch.cuda.get_device_properties(dev_index).multi_processor_count


def _grid(tokens, cfg: LaunchConfig, dev: torch.device):
    """Number of programs: one per row block, or (persistent) at most SMs * programs_per_sm.
    ``tokens`` may be a SymInt (Inductor's launch path), hence sym_min."""
    blocks = (tokens + cfg.block_m - 1) // cfg.block_m
    if cfg.programs_per_sm <= 0:
        return blocks
    if INTERPRET:
        sms = _INTERPRET_SMS
    else:
        sms = _sm_count(torch.cuda.current_device() if dev.index is None else dev.index)
    return torch.sym_min(blocks, sms * cfg.programs_per_sm)


def column_tiles(hidden: int, group: int) -> tuple[int, ...]:
    """Widths of up to three power-of-two tiles covering ``hidden`` (the last one masked).

    The top two set bits of ``hidden`` exactly, the rest padded to a power of two: 5376 ->
    (4096, 1024, 256), 2304 -> (2048, 256), 3000 -> (2048, 512, 512). One padded tile when
    that wastes < 10% of the lanes or the row is small. For per-group FP8 every width is a
    multiple of the group (hidden % group == 0 and group is a power of two).
    """
    one = _next_pow2(hidden)
    if hidden < 512 or one * 0.9 <= hidden:
        return (one,)
    w0 = 1 << (hidden.bit_length() - 1)
    rest = hidden - w0
    w1 = 1 << (rest.bit_length() - 1)
    rest -= w1
    widths = (w0, w1) if rest == 0 else (w0, w1, max(_next_pow2(rest), group or 1))
    return widths if sum(widths) <= 0.9 * one else (one,)


@functools.lru_cache(maxsize=None)
def launch_config(hidden: int, group: int, amax: bool = False) -> LaunchConfig:
    """Rows per program, column tiles and num_warps for a hidden size (group 0: per row) and
    whether the kernel reduces an amax for a dynamic scale (``launch_key``).

    The whole row is held in registers. Small rows (QK norm, H=128) take several rows per
    program so each program still moves ~2K elements; for one power-of-two tile warps grow
    with the row so each thread keeps 8-16 values (16-byte loads for 16-bit data). Split rows
    use fewer warps (~1K lanes per warp), so the small tiles are not spread thinner than
    one 16-byte vector per thread (measured on H100 at 5376: 4 warps 0.95 of copy for
    rms_norm, 8 warps 0.80, 16 warps 0.78). Per-group FP8 splits too (H200 run 28 at
    8192x5376: three tiles with 4 warps 0.88 of copy, one padded 8192 tile 0.73; the H100's
    110 registers of run 7 are gone since the tiles keep their own layouts).
    A kernel that reduces an amax after the sum of squares (dynamic FP8 / INT8, group FP8,
    MXFP8: ``AMAX_MODES``) takes ~1K lanes per warp on one tile too (32 values per thread):
    on the H200 (run 63, eager, 4096 / 8192 columns, half the warps against 16 values per
    thread) INT8 dynamic ran 5-16% faster at 2048-16384 tokens (8192x8192 0.89 of copy
    against 0.77), group-128 FP8 2-11%, MXFP8 2-11%, the gated norm + FP8 2-37% from 8192
    tokens (3% slower at 2048x4096), add + FP8 dynamic within 1%. At 1-32 tokens it costs
    0.0-0.3 us (gated + FP8 0.5 us). Static scales (one reduction) keep 16 values per thread:
    half the warps lost 2-3% at 8192 columns.
    """
    widths = column_tiles(hidden, group)
    lanes = sum(widths)
    block_m = max(1, 2048 // _next_pow2(lanes))
    elems = block_m * lanes
    if len(widths) > 1:
        num_warps = min(16, max(4, 1 << ((lanes // 1024).bit_length() - 1) if lanes >= 1024 else 4))
    elif elems >= 32768:
        num_warps = 32
    else:
        per_warp = 1024 if amax else 512
        num_warps = min(16, max(4, 1 << ((elems // per_warp).bit_length() - 1) if elems >= per_warp else 4))
    if group:  # per-group FP8: 8 warps beat 16 on one 8192 tile (H100 run 7: 0.77 vs 0.72)
        num_warps = min(num_warps, 8)
    tiles = tuple((w // group, group) if group else (1, w) for w in widths)
    tiles += ((0, 1),) * (3 - len(tiles))
    # The persistent prefetching variant (programs_per_sm > 0) is off until measured.
    return LaunchConfig(block_m, tiles, num_warps, programs_per_sm=0)


def candidate_configs(hidden: int, group: int, amax: bool = False,
                      persistent: bool = True) -> list[LaunchConfig]:
    """The default config first, then rows per program x num_warps x (split | one padded
    tile), then (``persistent``) the default's prefetching variant with 1 / 2 / 4 / 8 programs
    per SM.
    Every one gives a row the same bits for every token count (a config is per hidden size)."""
    default = launch_config(hidden, group, amax)
    out = [default]
    tilings = {column_tiles(hidden, group), (_next_pow2(hidden),)}
    for widths, block_m, warps in itertools.product(sorted(tilings), (1, 2, 4), (4, 8, 16)):
        if block_m * sum(widths) > 16384 or block_m * sum(widths) < warps * 32 * 4:
            continue
        tiles = tuple((w // group, group) if group else (1, w) for w in widths)
        cfg = LaunchConfig(block_m, tiles + ((0, 1),) * (3 - len(tiles)), warps)
        if cfg != default:
            out.append(cfg)
    if persistent:
        out += [default._replace(programs_per_sm=p) for p in (1, 2, 4, 8)]
    return out


def few_configs(hidden: int, group: int, amax: bool = False) -> list[LaunchConfig]:
    """What a compile-time measurement tries (each kernel variant costs a Triton compile):
    the default, then its persistent variant with 2 and 4 programs per SM (one more compile),
    then the default with the weight read after the reduction (EARLY_LOADS off: the same
    bits; which is faster depends on the family and the token count, H200 runs 39-44:
    reading it early wins at decode and for rms_norm at 8192 tokens, loses 3-5% for
    group-128 FP8 and the gated norm at 8192x4096).

    Only configs that give the default's bits can be chosen (a compiled row must round as
    the eager one), and the persistent loop keeps the default's rows per program, tiles and
    warps, so its reduction tree, bit for bit (tests/test_kernels_persistent.py). The other
    neighbours (half or double the warps, double the rows, the other tiling) reshape the
    tree: the measurement dropped them wherever the bits moved, and on the H200 the default
    beat the survivors in 9 of 9 shape classes (RESULTS.md run 27), at up to 20 s of Triton
    compiles per class. The persistent variant gained 1-3 points at 2048x4096 in the sweep
    (run 28); measured at 16 and 8192 tokens it lost to the default in 3 of 3 classes at
    H 4096 (run 33, 3-4 s a class)."""
    default = launch_config(hidden, group, amax)
    return ([default] + [default._replace(programs_per_sm=p) for p in (2, 4)]
            + [default._replace(early_loads=False)])


# A launch config chosen by measurement for one compiled call (lowerings/measure.py, the
# lower pass); None: launch_config's. Eager calls never set it: their bits stay the default's.
_CONFIG_OVERRIDE: contextvars.ContextVar[LaunchConfig | None] = contextvars.ContextVar(
    "compile_norm_launch_config", default=None)


@contextlib.contextmanager
def launch_config_used(cfg: LaunchConfig | None) -> Iterator[None]:
    """Launches prepared inside (this thread / task) use ``cfg`` (None: the default)."""
    token = _CONFIG_OVERRIDE.set(cfg)
    try:
        yield
    finally:
        _CONFIG_OVERRIDE.reset(token)


def config_to_json(cfg: LaunchConfig) -> list:
    out = [cfg.block_m, [list(t) for t in cfg.tiles], cfg.num_warps, cfg.programs_per_sm]
    return out if cfg.early_loads is None else out + [cfg.early_loads]


def config_from_json(v: list) -> LaunchConfig:
    return LaunchConfig(int(v[0]), tuple(tuple(int(a) for a in t) for t in v[1]), int(v[2]), int(v[3]),
                        bool(v[4]) if len(v) > 4 else None)


def _norm_group(call: NormCall, hidden: int) -> int:
    """The gated norm's group size when it normalizes per group (0: per row)."""
    g = call.norm_group
    return 0 if call.norm_before_gate or g is None or g == hidden else g


def launch_key(spec: OpSpec, args: tuple) -> tuple[int, bool]:
    """What a call's launch config depends on besides H (``launch_config``'s other
    arguments): the group size the kernel's tiles hold (0: per row), the scheme's or the
    gated norm's, and whether the kernel reduces an amax (``AMAX_MODES``)."""
    call = spec.split(args)
    return _launch_key(kernel_quant(spec, call.x, call.qargs), _norm_group(call, call.x.shape[-1]),
                       _outputs_layout(spec)[2])


def _launch_key(kq: KernelQuant, norm_group: int, mode: int) -> tuple[int, bool]:
    return kq.group or norm_group, mode in AMAX_MODES


def config_of(spec: OpSpec, args: tuple) -> LaunchConfig:
    """The launch config ``prepare`` takes for this call (positional, complete args)."""
    return _config(spec.split(args).x.shape[-1], launch_key(spec, args))


def _config(hidden: int, key: tuple[int, bool]) -> LaunchConfig:
    # a measured config in force (launch_config_used), else the rule's for the launch key
    return _CONFIG_OVERRIDE.get() or launch_config(hidden, *key)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as [T, H] with unit column stride (a view when the layout allows)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, hidden)




# --- one launch: what a call needs, derived from its op's spec ------------------------------

_NUM_RUNTIME_ARGS = 24  # norm_quant_kernel's arguments before the constexprs
_NO_QUANT = KernelQuant()
_SCALE_FIELDS = KernelQuant._fields.index("scale_form")  # KernelQuant[_SCALE_FIELDS:]: the scale arithmetic


class Launch(NamedTuple):
    """One call of ``norm_quant_kernel``: outputs, grid, arguments, constexprs, warps."""

    outputs: Any  # what the op returns (a tensor or a tuple), allocated by the op's fake
    grid0: Any  # int, or a SymInt under tracing
    args: tuple  # runtime arguments (None for pointers the constexprs switch off)
    consts: tuple  # constexprs, in signature order
    num_warps: int

    def const_kwargs(self) -> dict[str, Any]:
        return dict(zip(kernel_module().norm_quant_kernel.arg_names[_NUM_RUNTIME_ARGS:],
                        self.consts))


@functools.cache
def kernel_module():
    """``triton_kernel`` (imports triton): also where no GPU runs it, for fake-tensor tracing."""
    from . import triton_kernel

    return triton_kernel


def kernel_quant(spec: OpSpec, x: Any, qargs: tuple) -> KernelQuant | None:
    """The kernel's view of a call's scheme arguments; None where it cannot take them."""
    if spec.scheme is None:
        return _NO_QUANT
    if spec.scheme.kernel is None or spec.scheme.name not in QUANT_MODES:
        return None
    return spec.scheme.kernel(x, *qargs)


@functools.lru_cache(maxsize=4096)
def _constexprs(name: str, cfg: LaunchConfig, hidden: int, mode: int, has_weight: bool,
                w_offset: bool, vsize: bool, has_aux: bool, ue8m0: bool, scale_args: tuple,
                full_blocks: bool, mx_scale: int = 0, gate: int = 0, norm_grouped: bool = False,
                promote: bool = False, x_w_offset: bool = False, offsets_64: bool = True):
    """The kernel's constexprs for one op, launch config and argument configuration (cached:
    the eager hot path computes them once per configuration)."""
    spec = registry.spec(name)
    (ng0, g0), (ng1, g1), (ng2, g2) = cfg.tiles
    persistent = cfg.programs_per_sm > 0
    # Masks the kernel can drop: every row block full (the persistent prefetch reads past
    # the last block, so it keeps the row mask), tiles exactly as wide as the row.
    even_rows = not persistent and (cfg.block_m == 1 or full_blocks)
    even_cols = ng0 * g0 + ng1 * g1 + ng2 * g2 == hidden
    store_out = _outputs_layout(spec)[0]
    x_norm = spec.kind == Kind.NORM_ADD_NORM
    return (
        cfg.block_m, ng0, g0, ng1, g1, ng2, g2,
        spec.residual, spec.normalizes or spec.gated or x_norm, has_weight, w_offset, vsize,
        store_out, mode, has_aux, ue8m0,
        not INTERPRET, not INTERPRET, _FP8_RECIP, _INT8_RECIP, _U8_RECIP,
        persistent, even_rows, even_cols, mx_scale,
        *scale_args,  # SCALE_FORM, MIN_AT, MIN_VALUE, INV_MIN, SCALE_X_DT
        gate, norm_grouped, promote, x_norm, x_w_offset, offsets_64,
        _early_loads(cfg),
    )


@functools.lru_cache(maxsize=None)
def _outputs_layout(spec: OpSpec) -> tuple[bool, int, int]:
    """(stores ``out``, number of quantized outputs, kernel quant mode) of an op."""
    n_quant = len(spec.scheme.outputs) if spec.scheme is not None else 0
    mode = QUANT_MODES[spec.scheme.name] if spec.scheme is not None else 0
    stores_out = spec.kind in (Kind.NORM, Kind.ADD_NORM, Kind.GATED_NORM, Kind.NORM_ADD_NORM)
    return stores_out, n_quant, mode


# the quant modes whose quantized output the kernel can leave unwritten (scales only)
_SCALES_ONLY_MODES = tuple(QUANT_MODES[s] for s in ("fp8_dynamic", "int8_dynamic", "int8_dynamic_asym"))


def _offsets_64(tokens, hidden, sx, sr, st, sg, group) -> bool:
    """Whether a row offset of some tensor of the launch may pass int32: the last real row's
    x / residual element, an output's (rows of H), a scale's (per token, per group; column-
    major groups: group * tokens). Rows past T (masked) never address memory. A symbolic
    size (a dynamic-shape graph) keeps int64."""
    sizes = (tokens, sx, sr, st, sg)
    if not all(isinstance(v, int) for v in sizes):
        return True
    groups = hidden // group if group else 1
    last = max(tokens - 1, 0)
    largest = max(last * max(sx, sr) + hidden, tokens * hidden, last * st + groups * sg)
    return largest >= 2 ** 31


def _early_loads(cfg: LaunchConfig) -> bool:
    """Whether the launch reads the weight (gate, static scale) together with x, before the
    row's reduction (EARLY_LOADS): the config's choice where a measurement made one, else
    early unless persistent (a persistent loop already has the next block's loads in flight).
    H200, eager kernel, the other way round (runs 39, 44): decode (1-32 tokens) 0.1-0.8 us
    slower, 8192 tokens up to 4% slower for rms_norm / Gemma, static FP8 with its scale read
    early too 1-4% faster at 2048-8192 tokens; group-128 FP8 at 8192x4096 and the gated norm
    at 8192x4096 are 3-5% faster late, which a compile-time measurement finds (few_configs)."""
    if cfg.early_loads is not None:
        return cfg.early_loads
    return cfg.programs_per_sm <= 0


def prepare(spec: OpSpec, args: tuple, store_q: bool = True) -> Launch:
    """The launch of ``spec`` on ``args`` (positional, complete; the kernel must accept
    them). Zero tokens give grid 0: nothing to launch. On the eager hot path: keep it lean.
    ``store_q=False`` (per-token dynamic schemes): the scales only, the quantized output is
    allocated but not written (per-tensor FP8's first pass needs only them)."""
    call = spec.split(args)
    x = call.x
    kq = kernel_quant(spec, x, call.qargs)
    outputs = spec.fake(*args)  # empty outputs with the op's exact layout
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    store_out, n_quant, mode = _outputs_layout(spec)
    hidden = x.shape[-1]
    x2 = x if x.dim() == 2 and x.stride(1) == 1 else _rows(x, hidden)
    tokens = x2.shape[0]
    second = call.residual if call.residual is not None else call.gate  # one or neither
    r2 = None if second is None else (
        second if second.dim() == 2 and second.stride(1) == 1 else _rows(second, hidden))
    q, scales, azp = (*outs[:n_quant], None, None, None)[:3]
    if not store_q:
        if mode not in _SCALES_ONLY_MODES:
            raise ValueError(f"compile_norm: store_q=False needs a per-token dynamic scheme; "
                             f"{spec.name} has kernel quant mode {mode}")
        q = None
    if scales is not None and scales.dtype == _E8M0:  # Triton has no E8M0 pointers: bytes
        scales = scales.view(torch.uint8)
    weight, vsize = call.weight, call.variance_size
    gate, norm_group, promote, scale_args = 0, 0, False, kq[_SCALE_FIELDS:]
    if spec.gated:
        gate, norm_group = (1 if call.norm_before_gate else 2), _norm_group(call, hidden)
        promote = gated_out_dtype(x, weight, call.norm_before_gate) != x.dtype
        if promote:  # the quantized value is float32: rounding its scale to it is no rounding
            scale_args = (*scale_args[:-1], False)
    xw, x_eps, x_offset = call.x_norm or (None, 0.0, 0.0)  # rms_norm_add_rms_norm's x norm
    if kq.group:
        st, sg = (1, tokens) if kq.column_major else (hidden // kq.group, 1)
    else:
        st, sg = 1, 1
    sx = x2.stride(0)
    sr = sx if r2 is None else r2.stride(0)
    cfg = _config(hidden, _launch_key(kq, norm_group, mode))
    consts = _constexprs(
        spec.name, cfg, hidden, mode, weight is not None, call.weight_offset != 0.0,
        vsize is not None and vsize != hidden, kq.aux is not None, kq.ue8m0, scale_args,
        isinstance(tokens, int) and tokens % cfg.block_m == 0, kq.mx_scale, gate,
        norm_group != 0, promote, x_offset != 0.0,
        _offsets_64(tokens, hidden, sx, sr, st, sg, kq.group),
    )
    runtime = (
        x2, r2, weight, outs[0] if store_out else None, outs[-1] if spec.residual else None,
        q, scales, azp, kq.scale, kq.aux,
        tokens, hidden, sx, sr,
        1 if weight is None else weight.stride(0), st, sg,
        float(call.eps), float(call.weight_offset),
        norm_group or (hidden if vsize is None else vsize),  # V: the columns of one statistic
        xw, 1 if xw is None else xw.stride(0), float(x_eps), float(x_offset),
    )
    grid0 = (tokens + cfg.block_m - 1) // cfg.block_m if cfg.programs_per_sm <= 0 else \
        _grid(tokens, cfg, x.device)
    return Launch(outputs, grid0, runtime, consts, cfg.num_warps)


# --- eager launch --------------------------------------------------------------------------
# ``JITFunction[grid](...)`` (Triton's public launch) binds and specializes ~40 arguments per
# call: 36-46 us of host time on the H200 host, 4x an ATen call (benchmarks/RESULTS.md, the
# launch probe). A kernel compiled once by ``JITFunction.warmup`` and launched through
# ``CompiledKernel[grid]`` (the route Triton's fused-softmax tutorial shows) costs 16 us. The
# compiled kernel depends on our constexprs, num_warps and Triton's specialization of the
# runtime arguments (pointer dtypes and 16-byte alignment; integers equal to 1, divisible by
# 16, or 64-bit), so that is its cache key here. That key copies Triton's rule, so the route
# runs only on the Triton versions it was checked on (``FAST_LAUNCH``);
# tests/test_kernels.py checks the key against Triton's own cache on the GPU.

_FAST_LAUNCH_TRITON = ((3, 6),)
FAST_LAUNCH = bool(
    triton is not None and not INTERPRET
    and tuple(int(p) for p in triton.__version__.split(".")[:2]) in _FAST_LAUNCH_TRITON
)
_LAUNCHERS: dict = {}


def specialization_key(args: tuple) -> tuple | None:
    """What Triton specializes the runtime arguments on; None for a misaligned pointer (those
    take the public launch, which handles every case)."""
    ptr_bits = 0
    dtypes = []
    for t in args[:10]:
        if t is None:
            dtypes.append(None)
        else:
            ptr_bits |= t.data_ptr()
            dtypes.append(t.dtype)
    xw = args[20]  # rms_norm_add_rms_norm's x-norm weight
    if xw is not None:
        ptr_bits |= xw.data_ptr()
    if ptr_bits & 15:
        return None
    h, sx, sr, sw, v, sxw = args[11], args[12], args[13], args[14], args[19], args[21]
    # (remainders rather than "divisible by 16": a finer key, so never a wrong hit)
    return (*dtypes, None if xw is None else xw.dtype, h == 1, h % 16, sx == 1, sx % 16,
            sr == 1, sr % 16, sw == 1, sw % 16, v == 1, v % 16, sxw == 1, sxw % 16,
            max(args[10], sx, sr, args[15], args[16]) >= 2 ** 31)


def _jit_launch(launch: Launch) -> None:
    K.norm_quant_kernel[(launch.grid0,)](*launch.args, **launch.const_kwargs(),
                                         num_warps=launch.num_warps)


def _eager_launch(launch: Launch, device: int) -> None:
    if not FAST_LAUNCH:
        return _jit_launch(launch)
    spec_key = specialization_key(launch.args)
    if spec_key is None:
        return _jit_launch(launch)
    key = (device, launch.consts, launch.num_warps, spec_key)
    kernel = _LAUNCHERS.get(key)
    if kernel is None:
        kernel = K.norm_quant_kernel.warmup(*launch.args, **launch.const_kwargs(),
                                            num_warps=launch.num_warps, grid=(launch.grid0,))
        _LAUNCHERS[key] = kernel
    kernel[(launch.grid0, 1, 1)](*launch.args, *launch.consts)


def run(spec: OpSpec, args: tuple, store_q: bool = True) -> Any:
    """The triton provider of ``spec``: one kernel launch (none for zero tokens)."""
    launch = prepare(spec, args, store_q)
    if not launch.grid0:
        return launch.outputs
    if INTERPRET:
        _jit_launch(launch)
        return launch.outputs
    index, current = launch.args[0].device.index, torch.cuda.current_device()
    if index is None or index == current:
        _eager_launch(launch, current)
    else:
        with torch.cuda.device(index):
            _eager_launch(launch, index)
    return launch.outputs


# --- per-call checks and the provider table ---------------------------------------------------


def accepts(spec: OpSpec, args: tuple) -> bool:
    """Whether the kernel reproduces the reference on these (fake or real) arguments."""
    call = spec.split(args)
    if not _x_ok(call.x):
        return False
    if (spec.normalizes or spec.gated) and not _norm_ok(call.x, call.weight, call.variance_size):
        return False
    if spec.residual and not _on_device(call.residual):
        return False
    if spec.kind == Kind.NORM_ADD_NORM and (  # the kernel's x norm always has a weight
            call.x_norm[0] is None or not _norm_ok(call.x, call.x_norm[0], None)):
        return False
    kq = kernel_quant(spec, call.x, call.qargs)
    if kq is None:
        return False
    if spec.gated:
        group = _norm_group(call, call.x.shape[-1])
        if not _on_device(call.gate) or group & (group - 1) or (group and kq.group not in (0, group)):
            return False
    return True


def _provider_functions(spec: OpSpec) -> tuple:
    def fn(*args, **kwargs):
        return run(spec, spec.bind(args, kwargs))

    def supports(*args, **kwargs):
        return accepts(spec, spec.bind(args, kwargs))

    fn.__name__ = supports.__name__ = spec.name
    return fn, supports


def kernel_specs() -> list[OpSpec]:
    """The ops this kernel implements: every forward op whose scheme (if any) has a kernel
    configuration and a mode in the kernel (the backward has a kernel of its own)."""
    return [s for s in registry.specs() if s.kind in ROW_KERNEL_KINDS and (
        s.scheme is None or (s.scheme.kernel is not None and s.scheme.name in QUANT_MODES))]


FUNCTIONS = {spec.name: _provider_functions(spec) for spec in kernel_specs()}


def _unavailable(*args, **kwargs):
    raise RuntimeError(f"compile_norm: the triton provider cannot run here: {REASON}")


def provider(fn, supports, source: str) -> registry.Provider:
    """The "triton" provider around ``fn`` (unsupported here: carrying the reason)."""
    return registry.Provider(name=PROVIDER, fn=fn if SUPPORTED else _unavailable,
                             supported=SUPPORTED, supports=supports, rank=RANK, reason=REASON,
                             source=source)


def register() -> None:
    """Register the "triton" provider of every op the kernel implements."""
    for op, (fn, supports) in FUNCTIONS.items():
        registry.register_provider(op, provider(fn, supports, SOURCE))
