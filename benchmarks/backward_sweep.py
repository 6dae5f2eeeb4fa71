"""Sweep the launch configuration of the Triton rms_norm backward (GPU).

For each T x H, each candidate ``triton_backward.BackwardConfig`` (rows per block, warps,
programs per SM, register cap or none, loop pipelining stages) replaces ``triton_backward.launch_config`` for the
eager provider call (dx + fp32 dweight partials, then their column sums), with a weight and,
with ``--residual``, the fused add's ``grad_residual``. Each result is checked against the
default config's (dx and dweight within fp32 summation-order noise), then timed by CUDA-graph
replay (L2 flushed, median) next to a copy of the same element count. Bytes per element
(bf16): grad and x read, dx written: 6 (8 with grad_residual); the ratio is to the copy's 4.
The "no cap" rows are what a compiled graph launches (wrap_triton passes no register cap).
With ``--reduce`` the backward keeps its default config and the candidates are the dweight
column sums' ``triton_backward.ReduceConfig`` instead (columns per program x partial rows
per step x warps x loop stages), timed the same way.

    python benchmarks/backward_sweep.py --out $OUT
    python benchmarks/backward_sweep.py --reduce --shapes 2048x2048,32x4096
    python benchmarks/backward_sweep.py --shapes 8192x4096 --budget-s 60
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

from compile_norm.kernels import triton_backward as B  # noqa: E402
from compile_norm.lowerings.measure import graph_time_us  # noqa: E402

SHAPES = "8192x4096,16384x8192,8192x5376,2048x2048,2048x5376,65536x128"


def candidates(hidden: int, warps=(4, 8, 16, 32), stages=(1,), per_sms=(1, 2, 4)) -> list[B.BackwardConfig]:
    """The default first, then rows per block x warps x programs per SM x register cap (or
    none) x loop pipelining stages."""
    default = B.launch_config.__wrapped__(hidden)
    out = [default]
    block_h = default.block_h
    for block_m in sorted({default.block_m, 2 * default.block_m, max(1, default.block_m // 2)}):
        elems = block_m * block_h
        for num_warps in warps:
            if not 2 <= elems // (32 * num_warps) <= 64:
                continue  # 2 to 64 elements per thread per operand
            for per_sm in per_sms:
                if not 16 <= num_warps * per_sm <= 64:
                    continue  # a quarter to a full SM's worth of resident warps
                for cap in (min(255, 65536 // (32 * num_warps * per_sm)), None):
                    for num_stages in stages:
                        cfg = B.BackwardConfig(block_m, block_h, num_warps, per_sm, cap, num_stages)
                        if cfg not in out:
                            out.append(cfg)
    return out


def reduce_candidates(warps=(2, 4), stages=(1, 3)) -> list[B.ReduceConfig]:
    """The default column sums first, then columns per program x partial rows per step x
    warps x loop stages (1 to 32 elements per thread per step)."""
    out = [B.REDUCE_CONFIG]
    for block_c in (16, 32, 64):
        for block_p in (16, 32, 64):
            for num_warps in warps:
                if not 1 <= block_c * block_p // (32 * num_warps) <= 32:
                    continue
                for num_stages in stages:
                    cfg = B.ReduceConfig(block_c, block_p, num_warps, num_stages)
                    if cfg not in out:
                        out.append(cfg)
    return out


def label(cfg) -> str:
    if isinstance(cfg, B.ReduceConfig):
        return f"c{cfg.block_c} p{cfg.block_p} w{cfg.num_warps} s{cfg.num_stages}"
    return f"m{cfg.block_m} w{cfg.num_warps} p{cfg.programs_per_sm} r{cfg.maxnreg or '-'} s{cfg.num_stages}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--residual", action="store_true", help="with grad_residual (fused add)")
    p.add_argument("--warps", default=None, help="num_warps to try (default 4,8,16,32; --reduce 2,4)")
    p.add_argument("--stages", default=None, help="loop pipelining stages to try (default 1; --reduce 1,3)")
    p.add_argument("--per-sm", default="1,2,4", help="programs per SM to try")
    p.add_argument("--reduce", action="store_true",
                   help="sweep the dweight column sums' config (the backward's stays the default)")
    p.add_argument("--budget-s", type=float, default=240.0, help="all shapes together, shared equally")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "REDUCE_CONFIG" if a.reduce else "launch_config"
    real = getattr(B, name)
    rows, shapes = [], a.shapes.split(",")
    for shape in shapes:
        start = time.perf_counter()
        t, h = map(int, shape.split("x"))
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        g, w = torch.randn_like(x), (1 + 0.1 * torch.randn(h, device="cuda")).bfloat16()
        gr = torch.randn_like(x) if a.residual else None
        dst = torch.empty_like(x)
        copy_us = graph_time_us(lambda: dst.copy_(x))
        nbytes = (8 if a.residual else 6) * t * h
        print(f"== {shape}: copy {copy_us:.1f} us", flush=True)
        want = None
        ints = lambda s: tuple(map(int, s.split(",")))  # noqa: E731
        warps = ints(a.warps or ("2,4" if a.reduce else "4,8,16,32"))
        stages = ints(a.stages or ("1,3" if a.reduce else "1"))
        if a.reduce:
            configs = reduce_candidates(warps, stages)
        else:
            configs = candidates(h, warps, stages, ints(a.per_sm))
        for cfg in configs:
            if time.perf_counter() - start > a.budget_s / len(shapes):
                print(f"{shape}: budget spent", flush=True)
                break
            setattr(B, name, cfg if a.reduce else (lambda _, cfg=cfg: cfg))
            try:
                got = B.rms_norm_backward(g, x, w, 1e-6, 0.0, None, gr)
                if want is None:
                    want, status = got, "default"
                else:
                    ok = all(torch.allclose(u.float(), v.float(), rtol=2e-2, atol=2e-2) for u, v in zip(got, want))
                    status = "ok" if ok else "MISMATCH"
                us = graph_time_us(lambda: B.rms_norm_backward(g, x, w, 1e-6, 0.0, None, gr))
            except Exception as e:  # a config Triton cannot compile (registers, shared memory)
                status, us = f"error: {type(e).__name__}", float("nan")
            finally:
                setattr(B, name, real)
            ratio = nbytes / us / (4 * t * h / copy_us) if us == us else float("nan")
            rows.append(dict(shape=shape, config=label(cfg), us=us, ratio=ratio, check=status))
            print(f"{shape} {label(cfg):22s} {us:8.1f} us {ratio:5.2f} of copy {status}", flush=True)
    stem = "reduce_sweep" if a.reduce else "backward_sweep"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| T x H | best config | us | / copy | default us | default / copy |", "|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and r["check"] in ("ok", "default")]
        best = min(mine, key=lambda r: r["us"])
        default = next(r for r in mine if r["check"] == "default")
        lines.append(f"| {shape} | {best['config']} | {best['us']:.1f} | {best['ratio']:.2f} | "
                     f"{default['us']:.1f} | {default['ratio']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
