"""Compiled output against eager output, per output tensor, with a stated tolerance per dtype.

An element passes when ``|compiled - eager| <= atol + rtol * |eager|`` (torch.allclose's rule;
NaNs must sit at the same places). Whole-model tolerances are looser than single-op ones: the
compiled graph keeps intermediates in float32 and reorders reductions, and the differences grow
through the layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

# dtype -> (atol, rtol)
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    # one FP8 e4m3 step is 12.5 % of the value; rounding may differ by one step
    torch.float8_e4m3fn: (2.0**-6, 0.125),
    torch.float8_e5m2: (2.0**-14, 0.25),
    torch.int8: (1.0, 0.0),  # round-half-even at a tie may move by one step
}


@dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float  # over elements with |eager| > atol
    atol: float
    rtol: float
    ok: bool
    note: str = ""


def _name(path) -> str:
    s = pytree.keystr(path)
    return f"out{s}" if s else "out"


def _leaves(out):
    return pytree.tree_flatten_with_path(out)[0]


def compare(compiled, eager, tolerances=None) -> list[OutputCheck]:
    tols = dict(DEFAULT_TOLERANCES)
    tols.update(tolerances or {})
    got, want = _leaves(compiled), _leaves(eager)
    if len(got) != len(want):
        return [OutputCheck("out", "", [], float("nan"), float("nan"), 0, 0, False,
                            f"compiled returned {len(got)} values, eager {len(want)}")]
    checks = []
    for (path, c), (_, e) in zip(got, want):
        if not isinstance(e, torch.Tensor):
            ok = c == e
            checks.append(OutputCheck(_name(path), type(e).__name__, [], 0.0, 0.0, 0, 0, bool(ok),
                                      "" if ok else f"{c!r} != {e!r}"))
            continue
        checks.append(compare_tensor(_name(path), c, e, tols))
    return checks


def compare_tensor(name, c, e, tols) -> OutputCheck:
    """One compiled tensor against its eager one; ``tols``: dtype -> (atol, rtol)."""
    atol, rtol = tols.get(e.dtype, (0.0, 0.0))
    shape = list(e.shape)
    if not isinstance(c, torch.Tensor) or c.shape != e.shape or c.dtype != e.dtype:
        got = f"{c.dtype} {list(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
        return OutputCheck(name, str(e.dtype).replace("torch.", ""), shape, float("nan"),
                           float("nan"), atol, rtol, False, f"compiled gave {got}")
    cf, ef = c.detach().double().cpu(), e.detach().double().cpu()
    if ef.numel() == 0:
        return OutputCheck(name, str(e.dtype).replace("torch.", ""), shape, 0.0, 0.0, atol,
                           rtol, True, "empty")
    nan_c, nan_e = torch.isnan(cf), torch.isnan(ef)
    note = ""
    ok = bool(torch.equal(nan_c, nan_e))
    if not ok:
        note = "NaNs differ"
    both = ~(nan_c | nan_e)
    same_inf = torch.isinf(ef) & (cf == ef)
    diff = torch.where(both & ~same_inf, (cf - ef).abs(), torch.zeros_like(cf))
    ok = ok and bool((diff <= atol + rtol * ef.abs().nan_to_num(0.0, 0.0, 0.0)).all())
    big = ef.abs() > atol
    rel = torch.where(big & both, diff / ef.abs(), torch.zeros_like(diff))
    return OutputCheck(name, str(e.dtype).replace("torch.", ""), shape, float(diff.max()),
                       float(rel.max()), atol, rtol, ok, note)
