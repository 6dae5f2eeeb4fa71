"""Compiled numerics against eager, and batch invariance, per family and option set.

For each hand-written family of gpu_check (the code users write) and each option set, compile
with the backend (``dynamic=False``: one graph per token count, so the lowering may change with
it) and report

- ``eager diff``: the share of output elements whose bits differ from the same code run
  eagerly (every output: the normalized tensor, codes, scales, the residual);
- ``batch diff``: the share of elements of the first T rows whose bits differ between the call
  with T tokens and the call with the largest T (the same rows, more neighbours).

    python benchmarks/numerics.py --out $OUT                 # CUDA
    python benchmarks/numerics.py --device cpu --tokens 1,7,64 --hidden 384
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402  (the hand-written families)

FAMILIES = ("rms_norm", "gemma_rms_norm", "add_rms_norm", "rms_fp8_static", "add_rms_fp8_dynamic",
            "rms_fp8_group128", "rms_int8_dynamic")
OPTION_SETS = {
    "stock": ("inductor", {}),
    "stock emulate": ("inductor", {"emulate_precision_casts": True}),
    "backend (no emulate)": ("compile_norm", {"emulate_precision_casts": False}),
    "backend default": ("compile_norm", {}),
    "backend kernel": ("compile_norm", {"lowering": "kernel"}),
    "backend per-T": ("compile_norm", {"batch_invariant": False}),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8):
        return t.view(torch.uint8)
    if t.element_size() == 2:
        return t.view(torch.int16)
    return t.view(torch.int32) if t.element_size() == 4 else t


def _outputs(value) -> list[torch.Tensor]:
    return [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(v, torch.Tensor)]


def differing(a, b, rows: int | None = None) -> float:
    """Share of elements whose bits differ, over every output; with ``rows``, ``b`` is the
    call with more tokens and only its first ``rows`` rows are compared."""
    bad = total = 0
    for x, y in zip(_outputs(a), _outputs(b)):
        if rows is not None and y.dim() >= 1 and y.shape[0] != x.shape[0]:
            y = y[:rows]
        bad += int((_bits(x.contiguous()) != _bits(y.contiguous())).sum())
        total += x.numel()
    return bad / max(1, total)


def run(device: str, tokens: list[int], hidden: list[int], families: list[str], sets: list[str],
        budget_s: float) -> list[dict]:
    rows = []
    start = time.time()
    available = hasattr(torch._inductor.config, "batch_invariant")
    print(f"inductor batch_invariant config: {available}", flush=True)
    for h in hidden:
        big = max(tokens)
        fams_big = G.families(big, h, device)
        for fam in families:
            fn, args = fams_big[fam]["hf"]
            eager_big = fn(*args)
            for name in sets:
                backend, options = OPTION_SETS[name]
                compiled_big = None
                for t in sorted(tokens, reverse=True):
                    if time.time() - start > budget_s:
                        print(f"budget spent: stopping at {fam} {name} {t}x{h}", flush=True)
                        return rows
                    # the first t rows of the big call's inputs (weights, scales unchanged)
                    sub = tuple(a[:t] if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == big else a
                                for a in args)
                    torch._dynamo.reset()
                    try:
                        compiled = torch.compile(fn, backend=backend, options=options, dynamic=False)
                        out = compiled(*sub)
                    except Exception as e:  # report, go on
                        rows.append(dict(family=fam, H=h, T=t, set=name, error=f"{type(e).__name__}: {e}"[:300]))
                        print(f"{fam:22} {name:22} {t:>6}x{h:<5} ERROR {rows[-1]['error']}", flush=True)
                        continue
                    if t == big:
                        compiled_big = out
                    eager = fn(*sub)
                    row = dict(family=fam, H=h, T=t, set=name, eager_diff=differing(out, eager),
                               batch_diff=None if compiled_big is None else differing(out, compiled_big, rows=t))
                    rows.append(row)
                    bd = "-" if row["batch_diff"] is None else f"{row['batch_diff']:.2e}"
                    print(f"{fam:22} {name:22} {t:>6}x{h:<5} eager diff {row['eager_diff']:.2e}  "
                          f"batch diff {bd}", flush=True)
            del eager_big
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="8192,2048,256,1")
    p.add_argument("--hidden", default="4096,5376")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sets", default=",".join(OPTION_SETS))
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    rows = run(a.device, [int(t) for t in a.tokens.split(",")], [int(h) for h in a.hidden.split(",")],
               a.families.split(","), a.sets.split(","), a.budget_s)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "numerics.json").write_text(json.dumps(dict(env=G.env_info() if a.device == "cuda" else {}, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
