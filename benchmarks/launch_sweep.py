"""Sweep the eager Triton kernel's launch configuration per family and shape (GPU).

For each family of ``gpu_check.families`` or ``new_schemes.FAMILIES`` and each T x H, every
candidate launch config (rows per program x num_warps x column tiling, and the persistent
prefetching variant with 1 / 2 / 4 / 8 programs per SM) replaces ``triton_ops.launch_config`` for one
op call; the result is checked against the reference, then timed by CUDA-graph replay (L2
flushed, median) next to a copy of the same element count. The table says which config wins
and by how much over the default one: what ``launch_config`` should pick.

    python benchmarks/launch_sweep.py --out $OUT
    python benchmarks/launch_sweep.py --shapes 8192x4096 --families rms_int8_dynamic
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402
import new_schemes as N  # noqa: E402

from compile_norm.kernels import checking, triton_ops  # noqa: E402
from compile_norm.ops import registry  # noqa: E402

FAMILIES = ("rms_fp8_static", "rms_fp8_group128", "rms_int8_dynamic", "add_rms_fp8_dynamic")
SHAPES = "8192x4096,8192x5376,2048x2304"


def label(cfg: triton_ops.LaunchConfig) -> str:
    widths = "+".join(str(ng * g) for ng, g in cfg.tiles if ng)
    persistent = f" p{cfg.programs_per_sm}" if cfg.programs_per_sm else ""
    return f"m{cfg.block_m} w{cfg.num_warps} [{widths}]{persistent}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--only", default="", help="regex: sweep only the configs whose label matches "
                   "(the default config always runs)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    real = triton_ops.launch_config
    rows = []
    for shape in a.shapes.split(","):
        t, h = map(int, shape.split("x"))
        src = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_us = G.graph_time_us(lambda: dst.copy_(src))
        copy_bw = 4 * t * h / copy_us / 1e3
        suite = G.families(t, h)  # the rest: new_schemes.FAMILIES (MXFP8, gated)
        for fam in a.families.split(","):
            spec = suite[fam] if fam in suite else N.family(t, h, "cuda", fam)
            op, op_args = spec["ref_op"]
            key = triton_ops.launch_key(registry.spec(op), checking.positional(op, op_args, {}))
            best = None
            for i, cfg in enumerate(triton_ops.candidate_configs(h, *key)):
                if i and a.only and not re.search(a.only, label(cfg)):
                    continue
                triton_ops.launch_config = lambda *key, cfg=cfg: cfg
                regs = spills = None
                try:
                    n_before = len(triton_ops._LAUNCHERS)
                    check = N._check(spec["ref_op"], spec["op"])
                    if len(triton_ops._LAUNCHERS) > n_before:  # this config's compiled kernel
                        kernel = list(triton_ops._LAUNCHERS.values())[-1]
                        regs, spills = kernel.n_regs, kernel.n_spills
                    us = G.graph_time_us(spec["op"])
                except Exception as e:  # a config that does not compile (registers, ...)
                    check, us = f"{type(e).__name__}: {str(e)[:80]}", float("nan")
                finally:
                    triton_ops.launch_config = real
                ratio = spec["bytes"] / us / 1e3 / copy_bw
                row = dict(shape=shape, family=fam, config=label(cfg), default=i == 0, us=us,
                           ratio=ratio, check=check, regs=regs, spills=spills)
                rows.append(row)
                if check == "ok" and (best is None or us < best["us"]):
                    best = row
                print(f"{shape} {fam:<20} {row['config']:<26} {us:8.1f} us {ratio:5.2f}"
                      f" regs {regs} spills {spills}"
                      f"{' (default)' if i == 0 else ''} {check if check != 'ok' else ''}", flush=True)
            if best is not None:
                print(f"   best {best['config']} {best['ratio']:.2f}", flush=True)
    (out / "launch_sweep.json").write_text(json.dumps(rows, indent=1))
    lines = ["| T x H | family | default | ratio | best | ratio |", "|---|---|---|---|---|---|"]
    for (shape, fam), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["family"])):
        group = list(group)
        d = group[0]
        ok = [r for r in group if r["check"] == "ok"]
        b = min(ok, key=lambda r: r["us"]) if ok else d
        lines.append(f"| {shape} | {fam} | {d['config']} | {d['ratio']:.2f} | {b['config']} | {b['ratio']:.2f} |")
    (out / "launch_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
