"""Check a provider against the reference: inputs, cases and tolerances (tests + GPU check).

Why outputs may differ at all: the kernel reduces the fp32 sum of squares in another order
than ATen, so ``rstd`` can differ from the reference's by a few fp32 ulps; ``x * rstd`` then
lands on the other side of a rounding boundary for a few elements in 10^4. Everything after
``rstd`` is reproduced exactly. The bounds, in ulps of a 16-bit dtype ``D`` counted as the
distance of the bit patterns (``_ordinal16``: exact at binade boundaries, for subnormals
and across zero, unlike ``|ref| * 2**-m``):

- no weight, Gemma offset (fp32 ``w + offset``), or an fp32 weight: one rounding after
  ``rstd`` -> 1 ulp of x.dtype.
- 16-bit weight, ``weight_offset == 0`` (Llama: ``round(round(y) * w)`` in w.dtype): a flip
  of the first rounding moves the product by ``ulp(y) * w``, which is < 2 ulps of the
  product (``ulp(y) / |y| <= 2**-m`` while ``ulp(p) / |p| > 2**-(m+1)``), so after the second
  rounding the results are at most 2 ulps apart (exhaustively checked over every bf16 and
  fp16 pair in tests/test_kernels_checking.py). ``D`` is the coarser of x.dtype and w.dtype
  (fp32 x with a bf16 weight holds bf16 values: 2 bf16 ulps). Exception: where ``y`` is
  subnormal in D, ``ulp(y) / |y|`` is unbounded and the product moves by
  ``ulp_min * |w|``: an absolute floor of ``SUBNORMAL_ULPS`` smallest subnormals covers
  ``|w| < SUBNORMAL_ULPS - 1`` (fp16: 8 * 2**-24 ~ 5e-7); the same floor holds for every
  K >= 2 (the gated norm's ``|w * silu(g)|`` in place of ``|w|``).
- fp32 x with no / fp32 weight: rtol 1e-5, atol 1e-6 (only rstd's last-bit noise).
- the gated norm (``gated_out_tolerance``), gate after the norm: ``v * silu(g)`` rounded
  again, ``v`` the norm's output within K ulps: the relative error is kept while the ulp of
  the product may be half of v's, so within 2K ulps, plus one for silu's last fp32 bit
  (torch's exp and the kernel's may differ by an ulp: Sleef against numpy under the
  interpreter) -> 2K + 1. Gate before the norm: ``x * silu(g)`` is the product of the same
  floats, normalized and rounded once (1 ulp), then ``weight * y`` rounded in the 16-bit
  dtype or kept in float32 (a 16-bit y 1 ulp off is < 2 ulps off after the product) -> 2
  with a weight, 1 without; the float32 output of a 16-bit x is counted in ulps of x.dtype.
With ``eps_out = K * 2**-m`` (K ulps of D, m its mantissa bits) the relative error of any
``out`` value:

- ``residual_out``: bit-exact.
- ``out``: within K ulps of D; at most ``MISMATCH_FRACTION`` of the elements may differ at
  all (a systematic rounding bug, which can stay within K ulps, is caught by that).
- dynamic scales (amax / const of ``out``): rtol ``eps_out`` (plus one fp32 rounding);
  ``quant_*`` ops (exact math on identical input): rtol 1e-6.
- FP8 ``q``: codes at most one FP8 step apart (ordinal distance of e4m3 codes; ``q``
  and scale each move by <= eps_out <= 2**-6, less than the 2**-4 relative e4m3 step);
  NaN exactly where the reference has NaN. The gated norm's codes are held to one step too,
  though its K allows eps_out up to 5 * 2**-7 (bf16): that worst case needs roundings on
  both sides of the gate to line up on the element that sets the scale.
- INT8 ``q``: ``t = v / scale`` moves by ``|t| * 2 * eps_out`` (v and scale both move), so
  ``|dq| <= 1 + ceil(2 * eps_out * |t_ref|)`` per element (1 for ``quant_*`` ops);
  asymmetric ``azp`` (``-128 - vmin / scale``) by ``<= 1 + ceil(128 * eps_out)``, which
  ``q`` inherits on top.
- at most ``MISMATCH_FRACTION`` of ``q`` may differ for 16-bit x (or quant-only ops).
Dequantized errors (``q * scale``, ``(q - azp) * scale``) are reported as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ops import registry
from ..ops.spec import Kind

MISMATCH_FRACTION = 0.01
SUBNORMAL_ULPS = 8
_TINY = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}  # smallest subnormals
_MANT = {torch.bfloat16: 7, torch.float16: 10}
EPS = 1e-6


def all_ops() -> list[str]:
    """Every op the forward Triton kernel implements but rms_norm_add_rms_norm (the backward
    has its own checks). That one is checked as what it is, the rms_norm kernel then the
    fused-add kernel, bit for bit (tests/test_norm_add_norm.py): its residual_out inherits
    the first norm's rounding, which no per-output tolerance here describes."""
    from .triton_ops import kernel_specs

    return [s.name for s in kernel_specs() if s.kind != Kind.NORM_ADD_NORM]


def output_names(op: str) -> tuple[str, ...]:
    return registry.spec(op).outputs


_NORM_DEFAULTS = dict(weight="same", offset=0.0, variance_size=None, layout="contiguous",
                      nan=False)
# The gated norm's options: the gate before the norm (Mamba-2), its group size, the gate's layout.
_GATE_DEFAULTS = dict(gate_before=False, norm_group=None, gate_layout="contiguous")


class Case:
    """One call: ``op`` on ``x`` of ``shape``; options pick the variant.

    Norm options: ``weight`` ("same", "none", or a dtype name such as "float32" for a mixed
    weight), ``offset``, ``variance_size``, ``layout`` ("contiguous", "strided": row stride
    > H, "transposed"), ``nan``; the gated norm's: ``gate_before``, ``norm_group``,
    ``gate_layout`` (as ``layout``). Any other keyword is an option of the op's scheme
    (``QuantScheme.options``: ``group_size``, ``column_major``, ``scale_ub``, ...).
    """

    def __init__(self, op: str, shape: tuple, dtype: torch.dtype, label: str = "", **options):
        self.op, self.shape, self.dtype, self.label = op, tuple(shape), dtype, label
        spec = registry.spec(op)
        scheme = spec.scheme
        self.scheme_options = dict(scheme.options) if scheme else {}
        own = {**_NORM_DEFAULTS, **(_GATE_DEFAULTS if spec.gated else {})}
        for key in options:
            if key not in own and key not in self.scheme_options:
                known = sorted([*own, *self.scheme_options])
                raise TypeError(f"Case({op!r}): unknown option {key!r}; known: {known}")
        for key, default in {**_NORM_DEFAULTS, **_GATE_DEFAULTS}.items():
            setattr(self, key, options.get(key, default))
        self.scheme_options.update((k, v) for k, v in options.items() if k in self.scheme_options)

    def __getattr__(self, key: str) -> Any:  # scheme options read as attributes
        options = self.__dict__.get("scheme_options", {})
        if key in options:
            return options[key]
        raise AttributeError(key)

    def name(self) -> str:
        opts = [f"{k}={v}" for k, v in self.options().items()]
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.op}[{'x'.join(map(str, self.shape))} {dt}{' ' if opts else ''}{','.join(opts)}]"

    def options(self) -> dict:
        d = {k: getattr(self, k) for k, v in {**_NORM_DEFAULTS, **_GATE_DEFAULTS}.items()
             if getattr(self, k) != v}
        scheme = registry.spec(self.op).scheme
        if scheme:
            d.update((k, v) for k, v in self.scheme_options.items() if v != scheme.options[k])
        return d

    def __repr__(self) -> str:
        return f"Case({self.name()})"


def _make(shape, dtype, device, layout, gen, scale=1.0, shift=0.0) -> torch.Tensor:
    hidden = shape[-1]
    full = shape
    if layout == "strided":  # a column slice: row stride > H
        full = (*shape[:-1], hidden + 24)
    elif layout == "transposed":  # leading dims swapped: not flattenable as a view
        full = (shape[1], shape[0], *shape[2:])
    t = (torch.randn(full, generator=gen) * scale + shift).to(device=device, dtype=dtype)
    if layout == "strided":
        t = t[..., 3:hidden + 3]
    elif layout == "transposed":
        t = t.transpose(0, 1)
    return t


def build_call(case: Case, device: str | torch.device, seed: int = 0) -> tuple[tuple, dict]:
    """Positional args and kwargs of ``torch.ops.compile_norm.<case.op>`` for this case."""
    gen = torch.Generator().manual_seed(seed)
    spec = registry.spec(case.op)
    shape, dtype, hidden = case.shape, case.dtype, case.shape[-1]
    shift = spec.scheme.input_shift if spec.scheme else 0.0
    x = _make(shape, dtype, device, case.layout, gen, shift=shift)
    if case.nan:  # one NaN in row 1: the reference makes the row's outputs / scale NaN
        x[min(1, shape[0] - 1), hidden // 3] = float("nan")
    args: list[Any] = [x]
    if spec.residual:
        args.append(_make(shape, dtype, device, case.layout, gen, scale=0.5))
    if spec.gated:  # silu's curved part and both tails
        args.append(_make(shape, dtype, device, case.gate_layout, gen, scale=3.0))
    if spec.normalizes or spec.gated:
        if case.weight == "none":
            w = None
        else:
            wdt = dtype if case.weight == "same" else getattr(torch, case.weight)
            base = 0.1 * torch.randn(hidden, generator=gen)
            w = (base if case.offset else 1.0 + base).to(device=device, dtype=wdt)
        args += [w, EPS]
    kwargs: dict[str, Any] = {}
    if spec.scheme:
        kwargs.update(spec.scheme.example_args(case.scheme_options, device))
    if spec.normalizes:
        kwargs["weight_offset"] = case.offset
        kwargs["variance_size"] = case.variance_size
    if spec.gated:  # its last two parameters (the group's name differs in the fused ops)
        placement, group = list(spec.signature.parameters)[-2:]
        kwargs[placement], kwargs[group] = not case.gate_before, case.norm_group
    return tuple(args), kwargs


def positional(op: str, args: tuple, kwargs: dict) -> tuple:
    """The call as the dispatcher hands it to providers (all positional)."""
    pos, kw = registry.normalize_call(op, args, kwargs)
    assert not kw
    return pos


def fake_outputs(op: str, args: tuple) -> tuple:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = getattr(torch.ops.compile_norm, op)(*args)
    return out if isinstance(out, tuple) else (out,)


# --- comparison ----------------------------------------------------------------------------


def _fp8_ordinal(q: torch.Tensor) -> torch.Tensor:
    """Monotonic integer code of float8_e4m3fn values (adjacent values differ by 1)."""
    b = q.view(torch.uint8).to(torch.int32)
    mag = b & 0x7F
    return torch.where(b >= 128, -mag, mag)


def _fp8_nan(q: torch.Tensor) -> torch.Tensor:
    return (q.view(torch.uint8) & 0x7F) == 0x7F


@dataclass
class Result:
    name: str
    ok: bool
    errors: dict[str, float] = field(default_factory=dict)  # per output: max abs error
    mismatch: dict[str, float] = field(default_factory=dict)  # fraction of differing elements
    problems: list[str] = field(default_factory=list)


_BITS16 = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _ordinal16(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Monotonic integer code of ``t`` as ``dtype`` (adjacent values differ by 1; -0 == 0).

    ``t`` must hold values of ``dtype`` exactly (it is converted first)."""
    b = t.to(dtype).view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def out_tolerance(x_dtype: torch.dtype, w_dtype: Any = "same", weight_offset: float = 0.0):
    """(D, K) for ``out``: within K ulps of 16-bit dtype D; (None, 0) means fp32 rtol.

    ``w_dtype``: the weight's dtype, None without weight, "same" for x.dtype.
    """
    w_dtype = x_dtype if w_dtype == "same" else w_dtype
    two = w_dtype in _MANT and weight_offset == 0.0  # round(round(y) * w) in w.dtype
    cands = [d for d in ((x_dtype, w_dtype) if two else (x_dtype,)) if d in _MANT]
    if not cands:
        return None, 0
    d = min(cands, key=lambda t: _MANT[t])  # the coarser one
    return d, 2 if two else 1


def gated_out_tolerance(x_dtype: torch.dtype, w_dtype: Any = "same", gate_before: bool = False):
    """(D, K) for the gated norm's ``out``, as ``out_tolerance`` (module docstring)."""
    d, k = out_tolerance(x_dtype, w_dtype)
    if d is None:
        return d, k
    if gate_before:
        return d, 1 if w_dtype is None else 2
    return d, 2 * k + 1


def _out_close(a, b, x_dtype, ulp_dtype, k):
    """(within tolerance, max abs err, mismatch fraction) for a float output."""
    nan_ok = torch.equal(a.isnan(), b.isnan())
    fin = ~b.isnan()
    ad, bd = a.double(), b.double()
    diff = torch.where(fin & a.isfinite() & b.isfinite(), (ad - bd).abs(),
                       torch.where(ad == bd, 0.0, math.inf))
    diff = torch.where(fin, diff, 0.0)
    if ulp_dtype is None:  # fp32: rstd's last-bit noise only
        within = bool(torch.where(fin, diff <= bd.abs() * 1e-5 + 1e-6, True).all())
    else:
        inf_same = torch.where(a.isinf() | b.isinf(), ad == bd, True)
        dist = (_ordinal16(a, ulp_dtype) - _ordinal16(b, ulp_dtype)).abs()
        floor = SUBNORMAL_ULPS * _TINY[ulp_dtype] if k >= 2 else 0.0
        within = bool(torch.where(fin, ((dist <= k) | (diff <= floor)) & inf_same, True).all())
    within = within and nan_ok
    mism = float((diff != 0).double().mean()) if diff.numel() else 0.0
    err = float(diff.max()) if diff.numel() else 0.0
    return within, err, mism


def _rel_close(a, b, rtol):
    """(within rtol, max abs err, mismatch fraction); NaN must match NaN."""
    ad, bd = a.double(), b.double()
    nan_ok = torch.equal(a.isnan(), b.isnan())
    fin = ~b.isnan()
    diff = torch.where(fin & a.isfinite() & b.isfinite(), (ad - bd).abs(),
                       torch.where(ad == bd, 0.0, math.inf))
    diff = torch.where(fin, diff, 0.0)
    within = bool(torch.where(fin, diff <= bd.abs() * rtol, True).all()) and nan_ok
    mism = float((diff != 0).double().mean()) if diff.numel() else 0.0
    err = float(diff.max()) if diff.numel() else 0.0
    return within, err, mism


def compare(op: str, got: Any, ref: Any, x_dtype: torch.dtype, fakes: tuple | None = None,
            w_dtype: Any = "same", weight_offset: float = 0.0, gate_before: bool = False) -> Result:
    """Compare a provider's outputs with the reference's (tolerances: module docstring).

    ``w_dtype`` / ``weight_offset`` describe the call's weight (None: no weight; "same":
    x.dtype); they set how many roundings follow ``rstd``, as does ``gate_before`` (the
    gated norm's placement of its gate)."""
    names = output_names(op)
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    res = Result(name=op, ok=True)
    if len(got) != len(names) or len(ref) != len(names):
        res.ok = False
        res.problems.append(f"expected {len(names)} outputs, got {len(got)}")
        return res
    spec = registry.spec(op)
    quant_only = spec.kind == Kind.QUANT
    ulp_dtype, k = (gated_out_tolerance(x_dtype, w_dtype, gate_before) if spec.gated
                    else out_tolerance(x_dtype, w_dtype, weight_offset))
    # relative error bound of an ``out`` value (what scales and q inherit)
    eps_out = 0.0 if quant_only else (
        k * 2.0 ** -_MANT[ulp_dtype] if ulp_dtype is not None else 2.0 ** -20)
    by_name_got, by_name_ref = dict(zip(names, got)), dict(zip(names, ref))
    for i, n in enumerate(names):
        g, r = got[i], ref[i]
        if g.shape != r.shape or g.dtype != r.dtype:
            res.problems.append(f"{n}: {tuple(g.shape)} {g.dtype} vs ref {tuple(r.shape)} {r.dtype}")
            continue
        if fakes is not None and g.numel() and g.stride() != fakes[i].stride():
            res.problems.append(f"{n}: strides {g.stride()} != fake {fakes[i].stride()}")
        if g.numel() == 0:
            res.errors[n], res.mismatch[n] = 0.0, 0.0
            continue
        if n == "residual_out":
            exact = torch.equal(g.isnan(), r.isnan()) and bool(
                torch.where(r.isnan(), 0.0, (g.float() - r.float()).abs()).max() == 0
            )
            res.errors[n] = float(torch.nan_to_num((g.float() - r.float()).abs(), 0.0).max())
            res.mismatch[n] = 0.0 if exact else 1.0
            if not exact:
                res.problems.append(f"{n}: not bit-exact")
        elif n == "out":
            within, err, mism = _out_close(g, r, x_dtype, ulp_dtype, k)
            res.errors[n], res.mismatch[n] = err, mism
            if not within:
                what = f"{k} ulp of {str(ulp_dtype)[6:]}" if ulp_dtype else "rtol 1e-5"
                res.problems.append(f"{n}: beyond {what} (max err {err:.3g})")
            # fp32 outputs all carry the statistic's last-bit noise: rtol only
            if mism > MISMATCH_FRACTION and x_dtype in _MANT:
                res.problems.append(f"{n}: {mism:.2%} of elements differ")
        elif n in ("scale", "scales"):
            rtol = 1e-6 if quant_only else eps_out * (1 + 2.0 ** -20) + 2.0 ** -23
            within, err, mism = _rel_close(g, r, rtol)
            if not within and n == "scales":
                # UE8M0 may jump a power of two when the amax sits on one; count those.
                within = mism <= MISMATCH_FRACTION and bool(
                    ((g.double() / r.double()).nan_to_num(1.0) - 1).abs().le(1.0).all())
            res.errors[n], res.mismatch[n] = err, mism
            if not within:
                res.problems.append(f"{n}: beyond rtol {rtol:.3g} (max err {err:.3g})")
            if mism > MISMATCH_FRACTION and quant_only:
                res.problems.append(f"{n}: {mism:.2%} of elements differ")
        elif n == "azp":
            d = (g.long() - r.long()).abs()
            bound = 1 + math.ceil(128 * eps_out)
            res.errors[n], res.mismatch[n] = float(d.max()), float((d != 0).double().mean())
            if int(d.max()) > bound:
                res.problems.append(f"{n}: differs by {int(d.max())} (> {bound})")
        elif n == "q":
            if g.dtype == torch.int8:
                d = (g.int() - r.int()).abs()
                t = r.double()
                if "azp" in by_name_ref:
                    t = t - by_name_ref["azp"].double()
                bound = 1 + torch.ceil(2 * eps_out * t.abs())
                if "azp" in by_name_ref:
                    bound = bound + math.ceil(128 * eps_out)
                step_ok = bool((d <= bound).all())
                worst = int((d - bound).max())
                if not step_ok:
                    res.problems.append(f"{n}: beyond the INT8 bound by {worst} (max diff {int(d.max())})")
            else:
                nan_g, nan_r = _fp8_nan(g), _fp8_nan(r)
                d = torch.where(nan_r, 0, (_fp8_ordinal(g) - _fp8_ordinal(r)).abs())
                step_ok = torch.equal(nan_g, nan_r) and int(d.max()) <= 1
                if not step_ok:
                    res.problems.append(f"{n}: more than one FP8 step apart (max {int(d.max())})")
            mism = float((d != 0).double().mean())
            res.mismatch[n] = mism
            res.errors[n] = _dequant_error(by_name_got, by_name_ref, g, r)
            if mism > MISMATCH_FRACTION and (x_dtype in _MANT or quant_only):
                res.problems.append(f"{n}: {mism:.2%} of elements differ")
    res.ok = not res.problems
    return res


def _dequant(outs, q, static_scale):
    """``q`` times its scale (per tensor, per row, or per group), zero point removed."""
    qf = q.float()
    if "scale" not in outs and "scales" not in outs:
        return qf * static_scale
    scale = (outs["scale"] if "scale" in outs else outs["scales"]).float()  # MX: E8M0 codes
    if scale.dim():  # per row or per group (a 0-d scale is per tensor)
        scale = scale.repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)
    if "azp" in outs:
        qf = qf - outs["azp"].float()
    return qf * scale


def _dequant_error(got_outs, ref_outs, g, r) -> float:
    """Max |dequant(got) - dequant(ref)| over elements where the reference is finite."""
    one = torch.ones((), device=g.device)
    a, b = _dequant(got_outs, g, one), _dequant(ref_outs, r, one)
    d = torch.where(b.isfinite() & a.isfinite(), (a - b).abs(), 0.0)
    return float(d.max()) if d.numel() else 0.0


# --- case lists ----------------------------------------------------------------------------


def default_cases(
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    hiddens=(128, 2304, 3000, 4096, 5376),
    tokens=7,
    ops: list[str] | None = None,
    variants: bool = True,
) -> list[Case]:
    """Every op x dtype x hidden, plus (``variants``) layouts, Gemma offset, no / mixed
    weight, variance_size, NaN, zero tokens and scheme options on one hidden size in bf16;
    for the gated norm both placements of the gate, groups, weights and gate layouts."""
    ops = ops or all_ops()
    cases = []
    for op in ops:
        spec = registry.spec(op)
        hs = [h for h in hiddens if _valid(Case(op, (tokens, h), torch.bfloat16))] or [128]
        for dt in dtypes:
            for h in hs:
                cases.append(Case(op, (tokens, h), dt))
        if not variants:
            continue
        h, dt = hs[min(1, len(hs) - 1)], torch.bfloat16
        v = [
            dict(shape=(2, 3, h)),  # 3-D
            dict(shape=(tokens, h), layout="strided"),  # row stride > H
            dict(shape=(3, 2, h), layout="transposed"),
            dict(shape=(0, h)),  # zero tokens
            dict(shape=(h,)),  # 1-D (one token)
            dict(shape=(tokens, h), nan=True),
        ]
        if spec.normalizes:
            v += [
                dict(shape=(tokens, h), offset=1.0),  # Gemma
                dict(shape=(tokens, h), offset=1.0, dtype=torch.float16),
                dict(shape=(tokens, h), weight="none"),
                dict(shape=(tokens, h), weight="float32"),  # mixed weight dtype
                dict(shape=(tokens, h), offset=1.0, weight="float32"),  # Gemma: bf16 x, fp32 w
                dict(shape=(tokens, h), dtype=torch.float32, weight="bfloat16"),
                dict(shape=(tokens, h), variance_size=h // 2),
            ]
        if spec.gated:
            g = _norm_group(spec, h)
            v += [
                dict(shape=(tokens, h), weight="none"),
                dict(shape=(tokens, h), weight="float32"),
                dict(shape=(tokens, h), dtype=torch.float32, weight="bfloat16"),
                dict(shape=(tokens, h), gate_layout="strided"),  # gate row stride > H
                dict(shape=(3, 2, h), gate_layout="transposed"),
                dict(shape=(tokens, h), gate_before=True),
                dict(shape=(tokens, h), gate_before=True, weight="none"),
                dict(shape=(tokens, h), gate_before=True, weight="float32"),  # float32 out
                dict(shape=(tokens, h), gate_before=True, dtype=torch.float16, weight="bfloat16"),
                dict(shape=(2, 3, h), gate_before=True, norm_group=g),
                dict(shape=(tokens, h), gate_before=True, norm_group=g, weight="float32"),
                dict(shape=(tokens, h), gate_before=True, norm_group=g, dtype=torch.float16),
                dict(shape=(tokens, h), gate_before=True, norm_group=g, dtype=torch.float32),
                dict(shape=(tokens, h), gate_before=True, norm_group=g, nan=True),
                dict(shape=(tokens, h), gate_before=True, norm_group=h),  # one group: the row
                dict(shape=(0, h), gate_before=True, norm_group=g),
            ]
        for options in spec.scheme.variants if spec.scheme else ():
            options = dict(options)
            shape = options.pop("shape", lambda tokens, h: (tokens, h))(tokens, h)
            v.append(dict(shape=shape, **options))
        for opts in v:
            opts = dict(opts)
            cases.append(Case(op, opts.pop("shape"), opts.pop("dtype", dt), **opts))
    return cases


def _norm_group(spec, hidden: int) -> int:
    """A group size for the gated norm's cases: the group of the scheme's kernel where it has
    one (the tiles hold one kind of group), else the largest power of two < hidden dividing it."""
    if spec.scheme is not None and spec.scheme.kernel is not None:
        scheme = spec.scheme
        kq = scheme.kernel(torch.empty(1, hidden, device="meta"),
                           **scheme.example_args(scheme.options, "meta"))
        if kq is not None and kq.group:
            return kq.group
    return max(g for g in (1, 2, 4, 8, 16, 32, 64, 128, 256) if hidden % g == 0 and g < hidden)


def weight_dtype(case: Case) -> torch.dtype | None:
    """The dtype of the case's weight (None: no weight), as ``compare`` takes it."""
    spec = registry.spec(case.op)
    if case.weight == "none" or not (spec.normalizes or spec.gated):
        return None
    return case.dtype if case.weight == "same" else getattr(torch, case.weight)


def _valid(case: Case) -> bool:
    """Whether the op accepts this case's arguments (e.g. the group divides the hidden size)."""
    args, kwargs = build_call(case, "meta")
    try:
        registry.spec(case.op).check(*positional(case.op, args, kwargs))
    except ValueError:
        return False
    return True


def run_case(case: Case, device, fn: Callable | None = None, seed: int = 0) -> Result:
    """Run the triton provider (or ``fn``) and the reference on fresh inputs and compare."""
    args, kwargs = build_call(case, device, seed)
    pos = positional(case.op, args, kwargs)
    entry = registry.ops()[case.op]
    fn = fn or registry.providers(case.op)["triton"].fn
    ref = entry.reference(*pos)
    got = fn(*pos)
    res = compare(case.op, got, ref, case.dtype, fake_outputs(case.op, pos), weight_dtype(case),
                  case.offset, case.gate_before)
    res.name = case.name()
    return res
