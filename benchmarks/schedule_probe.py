"""Time the row kernel's load schedule both ways, on the GPU (eager kernel calls).

``EARLY_LOADS`` (triton_ops._early_loads): the weight (and a gate applied after the norm)
read together with x, before the row's reduction, against ptxas's own schedule (the weight
read after the reduction). Per family and
T x H: both kernel times, the copy's, and whether the outputs' bits are equal (they must be:
tests/test_kernels_interpret.py). CUDA-graph replay, L2 flushed, median
(lowerings/measure.graph_time_us).

    python benchmarks/schedule_probe.py --out $OUT
    python benchmarks/schedule_probe.py --tokens 1,32,256 --hidden 4096
    python benchmarks/schedule_probe.py --families gated_qwen3_next --hidden 3584,5376
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402
import new_schemes as N  # noqa: E402  (the gated and MX families' op calls)

from compile_norm.kernels import triton_ops  # noqa: E402
from compile_norm.lowerings.measure import graph_time_us  # noqa: E402
from compile_norm.ops import registry  # noqa: E402

EARLY_FAMILIES = ("rms_norm", "gemma_rms_norm", "add_rms_norm", "rms_fp8_static",
                  "add_rms_fp8_dynamic", "rms_fp8_group128")


def family_call(name: str, t: int, h: int) -> tuple[str, tuple]:
    """(op, args) of a suite family (gpu_check) or of a new scheme (new_schemes)."""
    if name in N.FAMILIES:
        return N.family(t, h, "cuda", name)["ref_op"]
    return G.families(t, h)[name]["ref_op"]


def copy_us(t: int, h: int) -> float:
    src = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return graph_time_us(lambda: dst.copy_(src))


def early(tokens: list[int], hiddens: list[int], families=EARLY_FAMILIES) -> list[dict]:
    rows, chosen = [], triton_ops._early_loads
    for h in hiddens:
        for t in tokens:
            base = copy_us(t, h)
            for name in families:
                op, args = family_call(name, t, h)
                spec = registry.spec(op)
                call = tuple(G.checking.positional(op, args, {}))
                row = dict(part="early", family=name, T=t, H=h, copy_us=round(base, 2))
                outs = {}
                for label in ("late", "early"):
                    triton_ops._early_loads = lambda *a, label=label: label == "early"
                    triton_ops._constexprs.cache_clear()  # (it derives EARLY_LOADS)
                    outs[label] = triton_ops.run(spec, call)
                    row[f"{label}_us"] = round(graph_time_us(lambda: triton_ops.run(spec, call)), 2)
                triton_ops._early_loads = chosen
                triton_ops._constexprs.cache_clear()
                row["same_bits"] = same_bits(outs["late"], outs["early"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def same_bits(a, b) -> bool:
    a, b = (list(v) if isinstance(v, tuple) else [v] for v in (a, b))
    return all(torch.equal(u.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
               for u, v in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1,8,32,128,256,512,1024,2048,8192")
    p.add_argument("--hidden", default="4096,5376")
    p.add_argument("--families", default=",".join(EARLY_FAMILIES),
                   help=f"comma list of {', '.join(EARLY_FAMILIES)} or of new_schemes.py's")
    p.add_argument("--out", default="out")
    a = p.parse_args(argv)
    families = a.families.split(",")
    bad = [f for f in families if f not in EARLY_FAMILIES and f not in N.FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}")
    rows = early([int(v) for v in a.tokens.split(",")], [int(v) for v in a.hidden.split(",")],
                 families)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedule_probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
