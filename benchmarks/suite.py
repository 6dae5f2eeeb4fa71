"""The benchmark suite of shared/BENCHMARKS.md in one command.

Families: rms_norm; Gemma rms_norm; fused add + rms_norm; rms_norm + FP8 static; add + rms_norm
+ FP8 dynamic per-token; rms_norm + FP8 group 128; rms_norm + INT8 dynamic per-token; rms_norm
forward + backward (training). Per-head QK norm rows (hidden 128) run the rms_norm, Gemma and
backward families.

Candidates, side by side, on the same hand-written Hugging Face style code (gpu_check.hf_*):
- ``compile_norm``: ``torch.compile(hf, backend="compile_norm", dynamic=False)`` (its passes
  must find and fuse the norm: the compile_norm counters of each compile are recorded);
- ``compile_norm kernel``: the same with ``options={"lowering": KERNEL_MODE}`` (quantizing
  families; ``--kernel-mode auto`` for the choice table);
- ``compile_norm eager``: ``torch.ops.compile_norm.*`` (dispatch to the Triton provider);
- ``stock compile``: ``torch.compile(hf, dynamic=False)``;
- ``F.rms_norm eager``, ``Liger`` (``liger_kernel.ops``; where it has the op), ``copy``.

Method (BENCHMARKS.md): every candidate is first checked against the reference on fresh random
inputs (compiled candidates are compared loosely: a difference is flagged, not fatal); then
captured in a CUDA graph and ``graph.replay`` timed with ``triton.testing.do_bench`` (median,
L2 flushed); the copy of the same element count is timed in the same run. Effective bandwidth
= minimal bytes / time; ratio to the copy's bandwidth. At T <= 256 (latency bound) the row
reports microseconds next to the copy kernel's time instead. ``eager us``: wall time per
eager call.

    python benchmarks/suite.py --out $OUT              # --quick (default): < 6 min on an H100
    python benchmarks/suite.py --full --out $OUT       # every T x H of BENCHMARKS.md
    python benchmarks/suite.py --dry-run               # CPU: tiny shapes, checks only

In --quick, stock and compile_norm compiles are skipped at T <= 32 (only 1 x 4096 is in the
quick set: eager candidates still run there), the kernel-lowering candidate runs for the
quantizing families at T >= 2048 only, and compiled candidates stop once --budget-s is spent
(rows say "skipped: time budget").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402  (families, HF functions, timing, checks)

import compile_norm  # noqa: E402,F401
from compile_norm.kernels import triton_ops  # noqa: E402

FAMILIES = ("rms_norm", "gemma_rms_norm", "add_rms_norm", "rms_fp8_static", "add_rms_fp8_dynamic",
            "rms_fp8_group128", "rms_int8_dynamic", "rms_bwd")
QUANT_FAMILIES = ("rms_fp8_static", "add_rms_fp8_dynamic", "rms_fp8_group128", "rms_int8_dynamic")
SMALL_H_FAMILIES = ("rms_norm", "gemma_rms_norm", "rms_bwd", "rms_fp8_group128", "rms_int8_dynamic")  # per-head rows (H < 1024)
QUICK_SHAPES = "8192x4096,8192x5376,2048x2304,16384x4096,256x4096,1x4096,32768x128"
FULL_T = (1, 32, 256, 2048, 8192, 16384)
FULL_H = (2304, 3584, 4096, 5376, 7168, 8192)
QK_HEADS = 32
DRY_SHAPES = "5x256,3x384"
LATENCY_T = 256

def full_shapes() -> list[tuple[int, int]]:
    shapes = [(t, h) for h in FULL_H for t in FULL_T]
    return shapes + [(t * QK_HEADS, 128) for t in (1, 256, 2048, 8192)]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


# --- candidates ----------------------------------------------------------------------------------


def ensure_backend() -> None:
    """Register the ``compile_norm`` backend by name when the package is not pip-installed
    (the entry point is then missing, e.g. PYTHONPATH runs on the GPU machine)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    from compile_norm.backend import compile_norm_backend

    try:
        from torch._dynamo.backends.registry import lookup_backend

        lookup_backend("compile_norm")
    except Exception:
        if "compile_norm" not in _BACKENDS:
            register_backend(name="compile_norm")(compile_norm_backend)


def raise_recompile_limits() -> None:
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 1 << 20)


def liger():
    """(LigerRMSNormFunction, LigerFusedAddRMSNormFunction or None), or None if not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:
        return None
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except Exception:
        LigerFusedAddRMSNormFunction = None
    return LigerRMSNormFunction, LigerFusedAddRMSNormFunction


def fresh(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: Dynamo keeps its compiled entries per code
    object, so each (candidate, shape) compile gets its own cache (no guard walk over the
    whole run's entries in the eager-call timing, no recompile limit)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compile_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["compile_norm"].items() if v}


def bwd_family(t: int, h: int, dev: str) -> dict:
    """rms_norm forward + backward (dx, dw); minimal bytes 10 per element (fwd 4, bwd 6)."""
    bf16 = torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=bf16, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(bf16).requires_grad_()
    dy = torch.randn(t, h, device=dev, dtype=bf16)

    def train_step(f):
        return lambda: torch.autograd.grad(f(x, w), (x, w), dy)

    def reference():
        xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        return torch.autograd.grad(G.hf_rms(xf, wf), (xf, wf), dy.float())

    return dict(
        step=train_step, hf=G.hf_rms, args=(x, w), bytes=10 * t * h + 4 * h, reference=reference,
        op=lambda a, b: torch.ops.compile_norm.rms_norm(a, b, G.EPS),
        f_rms=lambda a, b: F.rms_norm(a, (h,), b, G.EPS),
    )


def check_grads(got, ref) -> str:
    """Loose check of (dx, dw) against fp32 autograd (bf16 grads: ~1e-2 relative)."""
    problems = []
    for name, g, r in zip(("dx", "dw"), got, ref):
        err = float((g.float() - r).abs().max() / r.abs().max().clamp(min=1e-12))
        if not err < 3e-2:
            problems.append(f"{name}: max err {err:.3g} of max |ref|")
    return "ok" if not problems else "; ".join(problems)


class Budget:
    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.time()

    def spent(self) -> bool:
        return self.seconds is not None and time.time() - self.t0 > self.seconds


def candidates(fam: str, t: int, h: int, dev: str, a) -> tuple[list[tuple], dict]:
    """[(name, make_fn, checker)] and the family's metadata. ``make_fn()`` builds the callable
    (compiling lazily); ``checker(fn)`` returns 'ok' or the problems."""
    cuda = dev == "cuda"
    lig = liger() if cuda else None
    compile_ok = not (a.quick and t <= 32)
    kernel_ok = cuda and fam in QUANT_FAMILIES and (not a.quick or t >= 2048)
    kernel_opts = {"lowering": a.kernel_mode}
    cands: list[tuple] = []

    if fam == "rms_bwd":
        spec = bwd_family(t, h, dev)
        ref = spec["reference"]()

        def chk(fn):
            return check_grads(fn(), ref)

        if compile_ok and not a.no_compile:
            cands.append(("compile_norm", lambda: spec["step"](torch.compile(fresh(spec["hf"]), backend="compile_norm", dynamic=False)), chk, True))
            cands.append(("stock compile", lambda: spec["step"](torch.compile(fresh(spec["hf"]), dynamic=False)), chk, True))
        cands.append(("compile_norm eager", lambda: spec["step"](spec["op"]), chk, False))
        cands.append(("F.rms_norm eager", lambda: spec["step"](spec["f_rms"]), chk, False))
        if lig is not None:
            fn = lambda a_, b_: lig[0].apply(a_, b_, G.EPS, 0.0, "llama", False)  # noqa: E731
            cands.append(("Liger", lambda: spec["step"](fn), chk, False))
        return cands, dict(bytes=spec["bytes"])

    spec = G.families(t, h, dev)[fam]
    hf, args = spec["hf"]

    def chk(fn):
        return G._check_candidate(spec["ref_op"], fn)

    def compiled(**kw):
        return lambda: (lambda c: (lambda: c(*args)))(torch.compile(fresh(hf), dynamic=False, **kw))

    if compile_ok and not a.no_compile:
        cands.append(("compile_norm", compiled(backend="compile_norm"), chk, True))
        if kernel_ok:
            cands.append((f"compile_norm {a.kernel_mode}", compiled(backend="compile_norm", options=kernel_opts), chk, True))
        cands.append(("stock compile", compiled(), chk, True))
        for name, (backend, options) in a.extra.items():  # --extra: option sets side by side
            cands.append((name, compiled(backend=backend, options=options), chk, True))
    cands.append(("compile_norm eager", lambda: spec["op"], chk, False))
    if spec["f_rms"] is not None:
        cands.append(("F.rms_norm eager", lambda: spec["f_rms"], chk, False))
    if lig is not None:
        x, w = args[0], args[-1]
        if fam == "rms_norm":
            cands.append(("Liger", lambda: (lambda: lig[0].apply(x, w, G.EPS, 0.0, "llama", False)), chk, False))
        elif fam == "gemma_rms_norm":
            cands.append(("Liger", lambda: (lambda: lig[0].apply(x, w, G.EPS, 1.0, "gemma", False)), chk, False))
        elif fam == "add_rms_norm" and lig[1] is not None:
            r = args[1]
            cands.append(("Liger", lambda: (lambda: lig[1].apply(x, r, w, G.EPS, 0.0, "llama", False)), chk, False))
    return cands, dict(bytes=spec["bytes"])


# --- the run ---------------------------------------------------------------------------------------


def run(a) -> list[dict]:
    dev = getattr(a, "device", None) or ("cpu" if a.dry_run else "cuda")  # (tests: cpu + fake timers)
    timing = not a.dry_run
    raise_recompile_limits()
    ensure_backend()
    budget = Budget(a.budget_s)
    rows: list[dict] = []
    for t, h in a.shape_list:
        shape = f"{t}x{h}"
        copy_us = copy_row(rows, t, h, dev) if timing else None
        if not timing:
            print(f"== {shape} (dry run)", flush=True)
        for fam in a.family_list:
            if h < 1024 and fam not in SMALL_H_FAMILIES and not a.dry_run:
                continue
            if fam == "rms_fp8_group128" and h % 128:
                continue
            cands, meta = candidates(fam, t, h, dev, a)
            for name, make, chk, is_compiled in cands:
                row = dict(shape=shape, family=fam, candidate=name, copy_us=copy_us)
                if is_compiled and budget.spent():
                    rows.append({**row, "skipped": "time budget"})
                    continue
                measure(row, make, chk, is_compiled, timing, meta["bytes"], t, h, copy_us)
                rows.append(row)
                print("   " + fmt_row(row), flush=True)
    return rows


def copy_row(rows: list[dict], t: int, h: int, dev: str) -> float:
    """Time the bf16 copy of a [t, h] tensor (every row's baseline), add its row; its time."""
    src = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_us = G.graph_time_us(lambda: dst.copy_(src))
    rows.append(dict(shape=f"{t}x{h}", family="copy", candidate="copy", graph_us=copy_us,
                     copy_us=copy_us, gbps=4 * t * h / copy_us / 1e3, ratio=1.0,
                     eager_us=G.eager_time_us(lambda: dst.copy_(src)), check="-"))
    print(f"== {t}x{h}: copy {copy_us:.1f} us", flush=True)
    return copy_us


def measure(row: dict, make: Callable, chk: Callable, is_compiled: bool, timing: bool,
            nbytes: int, t: int, h: int, copy_us: float | None) -> float | None:
    """Build, check and (``timing``) time one candidate into ``row``; its graph time or None.
    An exception is reported in the row ("error"), never raised."""
    try:
        torch._dynamo.utils.counters["compile_norm"].clear()
        t0 = time.time()
        fn = make()
        row["check"] = chk(fn)  # first call compiles
        if is_compiled:
            row["compile_s"] = round(time.time() - t0, 2)
            row["fusion"] = compile_counters()
        if not timing:
            return None
        g_us = G.graph_time_us(fn)
        row.update(graph_us=g_us, eager_us=G.eager_time_us(fn))
        if t > LATENCY_T:
            bw = nbytes / g_us / 1e3
            row.update(gbps=bw, ratio=bw / (4 * t * h / copy_us / 1e3))
        return g_us
    except Exception as e:  # report and go on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return None


def fmt_row(r: dict) -> str:
    head = f"{r['family']:<20} {r['candidate']:<22}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    parts = [head]
    if "graph_us" in r:
        parts.append(f"{r['graph_us']:8.1f} us")
        if "ratio" in r:
            parts.append(f"{r['gbps']:6.0f} GB/s {r['ratio']:5.2f} of copy")
        else:
            parts.append(f"(copy {r['copy_us']:.1f} us)")
        parts.append(f"| eager {r['eager_us']:7.1f} us")
    parts.append(f"| check {r.get('check')}")
    if r.get("fusion") is not None:
        parts.append(f"| fusion {r['fusion']}")
    return " ".join(parts)


# --- output ----------------------------------------------------------------------------------------


def env_info(dry: bool) -> dict:
    info = dict(torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                kernel_source=triton_ops.SOURCE[:16], dry_run=dry)
    if not dry:
        import triton

        info.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    lig = liger()
    info["liger"] = "installed" if lig else "not installed"
    return info


def _cell(r: dict) -> str:
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "error"
    flag = "" if r.get("check") in ("ok", "-") else "*"
    if "ratio" in r:
        return f"{r['ratio']:.2f}{flag}"
    if "graph_us" in r:
        return f"{r['graph_us']:.1f} us{flag}"
    return r.get("check", "")[:12]


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"# compile_norm benchmark suite: {info.get('device', 'CPU dry run')}", "",
             f"torch {info['torch']}, Triton {info.get('triton', '-')}, {info['date']}, kernel source "
             f"{info['kernel_source']}, Liger {info['liger']}", "",
             "Cells: ratio of effective bandwidth to the copy of the same element count (T > 256), "
             "or CUDA-graph kernel time in us (T <= 256; the copy column is the launch floor). "
             "`*`: the candidate's output differs from the reference beyond the op tolerance "
             "(see the detail table).", ""]
    cands: list[str] = []
    for r in rows:
        if r["family"] != "copy" and r["candidate"] not in cands:
            cands.append(r["candidate"])
    lines += ["| T x H | family | copy | " + " | ".join(cands) + " |",
              "|---|---|---|" + "---|" * len(cands)]
    keys: list[tuple[str, str]] = []
    for r in rows:
        if r["family"] != "copy" and (r["shape"], r["family"]) not in keys:
            keys.append((r["shape"], r["family"]))
    for shape, fam in keys:
        by = {r["candidate"]: r for r in rows if r["shape"] == shape and r["family"] == fam}
        any_row = next(iter(by.values()))
        copy = f"{any_row['copy_us']:.1f} us" if any_row.get("copy_us") else "-"
        lines.append(f"| {shape} | {fam} | {copy} | " + " | ".join(_cell(by[c]) if c in by else "" for c in cands) + " |")
    lines += ["", "## Detail", "",
              "| T x H | family | candidate | graph us | GB/s | / copy | eager us | compile s | check | fusion counters |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k, spec):
            return format(r[k], spec) if isinstance(r.get(k), (int, float)) else ""
        status = r.get("skipped") or r.get("error") or r.get("check", "")
        fusion = ", ".join(f"{k}={v}" for k, v in (r.get("fusion") or {}).items())
        lines.append(f"| {r['shape']} | {r['family']} | {r['candidate']} | {f('graph_us', '.1f')} | "
                     f"{f('gbps', '.0f')} | {f('ratio', '.2f')} | {f('eager_us', '.1f')} | "
                     f"{f('compile_s', '.1f')} | {str(status)[:100]} | {fusion} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=True, help="the quick shape set (default)")
    size.add_argument("--full", action="store_true", help="every T x H of BENCHMARKS.md plus QK norm")
    p.add_argument("--shapes", default="", help="comma list of TxH (overrides --quick/--full)")
    p.add_argument("--families", default="", help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--kernel-mode", default="kernel", choices=("kernel", "auto"))
    p.add_argument("--no-compile", action="store_true", help="eager candidates only")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop compiling after this many seconds from the start (default 270 with --quick)")
    p.add_argument("--cache", action="store_true",
                   help="allow Inductor's FX graph / AOT caches (faster; a cache hit runs no pass, "
                        "so the fusion counters stay empty)")
    p.add_argument("--extra", type=json.loads, default={},
                   help='more compiled candidates, JSON {name: [backend, options]}, e.g. '
                        '\'{"cn per-T": ["compile_norm", {"batch_invariant": false}]}\'')
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, checks only (no timing)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    a.quick = not a.full
    a.family_list = [f for f in a.families.split(",") if f] or list(FAMILIES)
    bad = [f for f in a.family_list if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}; known: {', '.join(FAMILIES)}")
    if a.dry_run:
        a.shape_list = parse_shapes(a.shapes or DRY_SHAPES)
        a.quick = False
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        a.shape_list = parse_shapes(a.shapes) if a.shapes else (full_shapes() if a.full else parse_shapes(QUICK_SHAPES))
        if a.budget_s is None and a.quick:
            a.budget_s = 270.0
    t0 = time.time()
    info = env_info(a.dry_run)
    print(json.dumps(info), flush=True)
    if a.cache:
        rows = run(a)
    else:  # compile for real: the passes run (and their counters prove the fusion) every time
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            rows = run(a)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(dict(env=info, rows=rows), indent=1, default=str))
    (out / "suite.md").write_text(markdown(info, rows))
    errors = [r for r in rows if "error" in r]
    print(f"== {len(rows)} rows, {len(errors)} errors; wrote {out}/suite.json and suite.md "
          f"in {time.time() - t0:.0f}s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
