"""GPU check and benchmark of the "triton" providers (run on an H100; BENCHMARKS.md method).

1. Correctness: every triton provider against the reference on fresh random inputs across
   dtypes / shapes / variants (compile_norm.kernels.checking tolerances); PASS/FAIL table.
2. Kernel time: each candidate captured in a CUDA graph, ``graph.replay`` timed with
   ``triton.testing.do_bench`` (median, L2 flushed between repetitions). Candidates: the
   eager triton provider (``torch.ops.compile_norm.*``), ``F.rms_norm`` eager (where it
   expresses the family), stock ``torch.compile(dynamic=False)`` of a hand-written Hugging
   Face style function, and ``dst.copy_(src)`` of the same element count (the ceiling).
   Effective bandwidth = minimal bytes / time; reported as a ratio to the copy.
3. Eager-call time (launch + Python + dispatch, no graph): wall time per call over a loop.
4. Writes results.json and results.md into --out (default $OUT or ./out).

    python benchmarks/gpu_check.py                      # check + bench, default shapes
    python benchmarks/gpu_check.py --shapes 8192x4096,1x4096 --families rms_norm,add_fp8_dynamic
    python benchmarks/gpu_check.py --no-bench           # correctness only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compile_norm  # noqa: E402
from compile_norm.kernels import checking, triton_ops  # noqa: E402
from compile_norm.lowerings.measure import graph_time_us  # noqa: E402,F401 (BENCHMARKS.md timer)
from compile_norm.ops import registry  # noqa: E402

DEFAULT_SHAPES = "8192x4096,8192x5376,2048x4096,2048x2304,16384x4096,1x4096,256x4096"
EPS = 1e-6
FP8 = torch.float8_e4m3fn
cn = torch.ops.compile_norm


# --- 1. correctness --------------------------------------------------------------------------


def check_cases(full: bool) -> list[checking.Case]:
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    if full:
        return checking.default_cases(hiddens=(128, 2304, 3000, 4096, 5376), tokens=67)
    ops = checking.all_ops()
    cases = [checking.Case(op, (67, h), bf16) for op in ops for h in (4096, 5376)]
    some = ["rms_norm", "fused_add_rms_norm", "rms_norm_fp8_dynamic", "quant_fp8_group",
            "fused_add_rms_norm_int8_dynamic_asym", "rms_norm_int8_static"]
    cases += [checking.Case(op, (67, 2304), dt) for op in some for dt in (f16, f32)]
    cases += [checking.Case(op, (1000, 128), bf16) for op in some]  # QK norm rows
    variants = ["rms_norm", "fused_add_rms_norm_fp8_dynamic", "rms_norm_fp8_group",
                "rms_norm_int8_dynamic_asym", "fused_add_rms_norm_fp8_static"]
    for op in variants:
        for opts in (dict(offset=1.0), dict(weight="none"), dict(layout="strided"),
                     dict(nan=True), dict(weight="float32"), dict(variance_size=1000)):
            cases.append(checking.Case(op, (67, 4096), bf16, **opts))
        cases.append(checking.Case(op, (3, 7, 4096), bf16))
        cases.append(checking.Case(op, (0, 4096), bf16))
    cases += [
        checking.Case("rms_norm_fp8_group", (67, 4096), bf16, group_size=64),
        checking.Case("rms_norm_fp8_group", (67, 4096), bf16, column_major=True, ue8m0=True),
        checking.Case("fused_add_rms_norm_fp8_dynamic", (67, 4096), bf16, scale_ub=True),
        checking.Case("fused_add_rms_norm_int8_static", (67, 4096), bf16, azp=True),
        checking.Case("rms_norm", (4099, 8192), bf16),
        checking.Case("rms_norm", (64, 65536), f32),
    ]
    return cases


def run_checks(full: bool) -> list[dict]:
    rows = []
    cases = check_cases(full)
    t0 = time.time()
    print(f"== correctness: {len(cases)} cases ({'full' if full else 'quick'})", flush=True)
    for case in cases:
        try:
            res = checking.run_case(case, "cuda")
            row = dict(case=case.name(), ok=res.ok, errors=res.errors, mismatch=res.mismatch,
                       problems=res.problems)
        except Exception as e:  # keep going; report it
            row = dict(case=case.name(), ok=False, errors={}, mismatch={},
                       problems=[f"{type(e).__name__}: {e}"])
        rows.append(row)
        errs = " ".join(f"{k}={v:.3g}" for k, v in row["errors"].items())
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['case']:<90} {errs} "
              f"{'; '.join(row['problems'])}", flush=True)
    bad = sum(not r["ok"] for r in rows)
    print(f"== correctness: {len(rows) - bad}/{len(rows)} PASS in {time.time() - t0:.0f}s", flush=True)
    return rows


# --- 2./3. timing ------------------------------------------------------------------------------


def eager_time_us(fn: Callable[[], Any]) -> float:
    """Wall time per back-to-back eager call (launch + Python included)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    n = max(20, min(2000, int(0.04 / max(one, 1e-6))))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


# Hand-written Hugging Face style functions (what stock torch.compile sees in a model).


def hf_rms(x, w):
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + EPS)).to(x.dtype)


def hf_gemma(x, w):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (y * (1.0 + w.float())).type_as(x)


def hf_add(x, r, w):
    h = x + r
    return hf_rms(h, w), h


def _fp8_dyn(y):
    yf = y.float()
    scale = (yf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return (yf / scale).clamp(-448.0, 448.0).to(FP8), scale


def hf_add_fp8_dynamic(x, r, w):
    y, h = hf_add(x, r, w)
    q, s = _fp8_dyn(y)
    return q, s, h


def hf_fp8_static(x, w, scale):
    return (hf_rms(x, w).float() / scale).clamp(-448.0, 448.0).to(FP8)


def hf_fp8_group128(x, w):
    y = hf_rms(x, w).float()
    g = y.reshape(*y.shape[:-1], y.shape[-1] // 128, 128)
    s = (g.abs().amax(-1) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    q = (g / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(FP8).reshape(y.shape)
    return q, s


def hf_int8_dynamic(x, w):
    y = hf_rms(x, w).float()
    s = (y.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-10)
    return torch.round(y / s).clamp(-128, 127).to(torch.int8), s


def families(t: int, h: int, dev: str = "cuda") -> dict[str, dict]:
    """Per family: op call, HF function + args, optional F.rms_norm eager, minimal bytes."""
    bf16 = torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=bf16)
    r = torch.randn(t, h, device=dev, dtype=bf16)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(bf16)
    wg = (0.1 * torch.randn(h, device=dev)).to(bf16)
    scale = torch.tensor(3.5 / 448.0, device=dev)
    n, wb = t * h, 2 * h
    return {
        "rms_norm": dict(
            op=lambda: cn.rms_norm(x, w, EPS), hf=(hf_rms, (x, w)),
            f_rms=lambda: F.rms_norm(x, (h,), w, EPS), bytes=4 * n + wb,
            ref_op=("rms_norm", (x, w, EPS))),
        "gemma_rms_norm": dict(
            op=lambda: cn.rms_norm(x, wg, EPS, weight_offset=1.0), hf=(hf_gemma, (x, wg)),
            f_rms=None, bytes=4 * n + wb, ref_op=("rms_norm", (x, wg, EPS, 1.0))),
        "add_rms_norm": dict(
            op=lambda: cn.fused_add_rms_norm(x, r, w, EPS), hf=(hf_add, (x, r, w)),
            f_rms=lambda: (lambda s: (F.rms_norm(s, (h,), w, EPS), s))(x + r), bytes=8 * n + wb,
            ref_op=("fused_add_rms_norm", (x, r, w, EPS))),
        "add_rms_fp8_dynamic": dict(
            op=lambda: cn.fused_add_rms_norm_fp8_dynamic(x, r, w, EPS),
            hf=(hf_add_fp8_dynamic, (x, r, w)), f_rms=None, bytes=7 * n + 4 * t + wb,
            ref_op=("fused_add_rms_norm_fp8_dynamic", (x, r, w, EPS))),
        "rms_fp8_static": dict(
            op=lambda: cn.rms_norm_fp8_static(x, w, EPS, scale=scale),
            hf=(hf_fp8_static, (x, w, scale)), f_rms=None, bytes=3 * n + wb,
            ref_op=("rms_norm_fp8_static", (x, w, EPS, scale))),
        "rms_fp8_group128": dict(
            op=lambda: cn.rms_norm_fp8_group(x, w, EPS, group_size=128),
            hf=(hf_fp8_group128, (x, w)), f_rms=None, bytes=3 * n + 4 * (n // 128) + wb,
            ref_op=("rms_norm_fp8_group", (x, w, EPS, 128))),
        "rms_int8_dynamic": dict(
            op=lambda: cn.rms_norm_int8_dynamic(x, w, EPS), hf=(hf_int8_dynamic, (x, w)),
            f_rms=None, bytes=3 * n + 4 * t + wb,
            ref_op=("rms_norm_int8_dynamic", (x, w, EPS))),
    }


def _check_candidate(ref_op, fn) -> str:
    """'ok' or the comparison's problems, against the reference on the same inputs."""
    op, args = ref_op
    pos = checking.positional(op, args, {})
    # families pass weight_offset (Gemma) as the 4th argument of rms_norm only
    offset = args[3] if op == "rms_norm" and len(args) > 3 else 0.0
    res = checking.compare(op, fn(), registry.ops()[op].reference(*pos), torch.bfloat16,
                           weight_offset=offset)
    return "ok" if res.ok else "; ".join(res.problems)[:120]


def run_bench(shapes: list[tuple[int, int]], names: list[str] | None, compile_: bool) -> list[dict]:
    import torch._dynamo

    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 4096)
    rows = []
    for t, h in shapes:
        src = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_us = graph_time_us(lambda: dst.copy_(src))
        copy_bw = 4 * t * h / copy_us / 1e3  # GB/s
        rows.append(dict(shape=f"{t}x{h}", family="copy", candidate="copy", graph_us=copy_us,
                         gbps=copy_bw, ratio=1.0, eager_us=eager_time_us(lambda: dst.copy_(src)),
                         check="-"))
        print(f"== {t}x{h}: copy {copy_us:.1f} us ({copy_bw:.0f} GB/s)", flush=True)
        for fam, spec in families(t, h).items():
            if names and fam not in names:
                continue
            cands: list[tuple[str, Callable, bool]] = [("triton eager", spec["op"], True)]
            if spec["f_rms"] is not None:
                cands.append(("F.rms_norm eager", spec["f_rms"], False))
            if compile_:
                hf, args = spec["hf"]
                compiled = torch.compile(hf, dynamic=False)
                cands.append(("stock compile (HF)", lambda c=compiled, a=args: c(*a), True))
            for cname, fn, check in cands:
                try:
                    status = _check_candidate(spec["ref_op"], fn) if check else "n/a"
                    g_us = graph_time_us(fn)
                    e_us = eager_time_us(fn)
                except Exception as e:
                    print(f"   {fam:<22} {cname:<20} ERROR {type(e).__name__}: {e}", flush=True)
                    rows.append(dict(shape=f"{t}x{h}", family=fam, candidate=cname, error=str(e)))
                    continue
                bw = spec["bytes"] / g_us / 1e3
                row = dict(shape=f"{t}x{h}", family=fam, candidate=cname, graph_us=g_us,
                           gbps=bw, ratio=bw / copy_bw, eager_us=e_us, check=status)
                rows.append(row)
                print(f"   {fam:<22} {cname:<20} {g_us:8.1f} us {bw:7.0f} GB/s "
                      f"{bw / copy_bw:5.2f} of copy | eager {e_us:7.1f} us | check {status}",
                      flush=True)
    return rows


# --- 4. output ---------------------------------------------------------------------------------


def env_info() -> dict:
    import triton

    return dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        kernel_source=triton_ops.SOURCE[:16],
    )


def markdown(info: dict, checks: list[dict], bench: list[dict]) -> str:
    lines = [f"# compile_norm triton providers: {info['device']}", "",
             f"torch {info['torch']}, Triton {info['triton']}, {info['date']}, "
             f"kernel source {info['kernel_source']}", ""]
    if checks:
        bad = [c for c in checks if not c["ok"]]
        lines += [f"## Correctness: {len(checks) - len(bad)}/{len(checks)} PASS", "",
                  "| case | result | max errors | problems |", "|---|---|---|---|"]
        for c in checks:
            errs = ", ".join(f"{k} {v:.3g}" for k, v in c["errors"].items())
            lines.append(f"| {c['case']} | {'PASS' if c['ok'] else 'FAIL'} | {errs} | "
                         f"{'; '.join(c['problems'])} |")
        lines.append("")
    if bench:
        lines += ["## Timing (bf16; CUDA-graph replay, L2 flushed, median; eager = wall time "
                  "per call)", "",
                  "| T x H | family | candidate | graph us | GB/s | / copy | eager us | check |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in bench:
            if "error" in b:
                lines.append(f"| {b['shape']} | {b['family']} | {b['candidate']} | error | | | | "
                             f"{b['error'][:80]} |")
                continue
            lines.append(f"| {b['shape']} | {b['family']} | {b['candidate']} | "
                         f"{b['graph_us']:.1f} | {b['gbps']:.0f} | {b['ratio']:.2f} | "
                         f"{b['eager_us']:.1f} | {b['check']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of TxH")
    p.add_argument("--families", default="", help="comma list (default all)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--full-check", action="store_true", help="the whole test-suite case list")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the stock torch.compile baseline")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if not triton_ops.SUPPORTED:
        print(f"triton provider unsupported: {triton_ops.REASON}", file=sys.stderr)
        return 2
    t0 = time.time()
    info = env_info()
    print(json.dumps(info), flush=True)
    checks = [] if a.no_check else run_checks(a.full_check)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    names = [f for f in a.families.split(",") if f] or None
    bench = [] if a.no_bench else run_bench(shapes, names, not a.no_compile)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(env=info, checks=checks, bench=bench), indent=1))
    (out / "results.md").write_text(markdown(info, checks, bench))
    print(f"== wrote {out}/results.json and results.md in {time.time() - t0:.0f}s total")
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
