"""Benchmarks of the schemes added by issue 13 part B (MXFP8), with the suite's method.

Family ``rms_mxfp8[_<mode>]``: a Hugging Face style RMSNorm (gpu_check.hf_rms) followed by
torchao's own ``to_mx`` (torchao/prototype/mx_formats, float8_e4m3fn, blocks of 32, the
scaling mode). Candidates, side by side, on that hand-written code:

- ``compile_norm``: ``torch.compile(fn, backend="compile_norm")`` (canonicalize + quant must
  fuse it into ``rms_norm_mxfp8``: the counters are recorded);
- ``stock compile``: ``torch.compile(fn)``;
- ``compile_norm eager``: ``torch.ops.compile_norm.rms_norm_mxfp8`` (the Triton kernel);
- ``copy`` of the same element count (bf16).

Minimal bytes per call: x (2 B/element) + weight read, q (1 B) + one E8M0 byte per 32 written.
Timing, checks and rows as benchmarks/suite.py (CUDA-graph replay, median, L2 flushed; the
copy timed in the same run). About 2.5 minutes on an H200 with the defaults.

    python benchmarks/new_schemes.py --out $OUT                  # T 2048..16384 x H 4096, 5376
    python benchmarks/new_schemes.py --dry-run                   # CPU: tiny shapes, checks only
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402  (HF norm, timers, checks)
import suite as S  # noqa: E402  (fresh compiles, backend registration, row format)

import compile_norm  # noqa: E402,F401

SHAPES = "2048x4096,8192x4096,16384x4096,2048x5376,8192x5376,16384x5376"
DRY_SHAPES = "5x256,3x384"
FAMILIES = {"rms_mxfp8": "floor", "rms_mxfp8_rceil": "rceil"}
# rceil (NVIDIA's recipe) only where its numbers matter most: keeps the run under 3 minutes
RCEIL_SHAPES = ("8192x4096", "8192x5376")


def hf_rms_mxfp8(x, w, mode: str):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    scales, q = to_mx(G.hf_rms(x, w), torch.float8_e4m3fn, 32, ScaleCalculationMode(mode))
    return q, scales


def family(t: int, h: int, dev: str, mode: str) -> dict:
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(torch.bfloat16)
    n = t * h
    return dict(
        hf=(lambda a, b: hf_rms_mxfp8(a, b, mode)), args=(x, w), bytes=3 * n + n // 32 + 2 * h,
        op=lambda: torch.ops.compile_norm.rms_norm_mxfp8(x, w, G.EPS, 32, mode),
        ref_op=("rms_norm_mxfp8", (x, w, G.EPS, 32, mode)))


def run(a) -> list[dict]:
    dev = "cpu" if a.dry_run else "cuda"
    S.raise_recompile_limits()
    S.ensure_backend()
    budget = S.Budget(a.budget_s)
    rows: list[dict] = []
    for t, h in S.parse_shapes(a.shapes):
        shape = f"{t}x{h}"
        copy_us = None if a.dry_run else S.copy_row(rows, t, h, dev)
        for fam, mode in FAMILIES.items():
            if mode == "rceil" and not a.dry_run and shape not in RCEIL_SHAPES:
                continue
            spec = family(t, h, dev, mode)
            hf, args = spec["hf"], spec["args"]

            def compiled(**kw):
                c = torch.compile(S.fresh(hf), dynamic=False, **kw)
                return lambda: c(*args)

            cands = [("compile_norm", lambda: compiled(backend="compile_norm"), True),
                     ("stock compile", lambda: compiled(), True),
                     ("compile_norm eager", lambda: spec["op"], False)]
            for name, make, is_compiled in cands:
                row = dict(shape=shape, family=fam, candidate=name, copy_us=copy_us)
                if is_compiled and budget.spent():
                    rows.append({**row, "skipped": "time budget"})
                    continue
                S.measure(row, make, lambda fn: G._check_candidate(spec["ref_op"], fn), is_compiled,
                          not a.dry_run, spec["bytes"], t, h, copy_us)
                rows.append(row)
                print("   " + S.fmt_row(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | family | candidate | us | of copy | vs stock | check |", "|---|---|---|---|---|---|---|"]
    stock = {(r["shape"], r["family"]): r.get("graph_us") for r in rows if r["candidate"] == "stock compile"}
    for r in rows:
        us = r.get("graph_us")
        base = stock.get((r["shape"], r["family"]))
        vs = f"{base / us:.2f}x" if us and base else "-"
        what = (r.get("error") or r.get("skipped") or r.get("check") or "").split("\n")[0]
        us_text = f"{us:.1f}" if us else "-"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        lines.append(f"| {r['shape']} | {r['family']} | {r['candidate']} | {us_text} | {ratio} | {vs} | {what} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help=f"TxH list (default {SHAPES}; dry run {DRY_SHAPES})")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, checks only")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop compiling after this")
    p.add_argument("--out", default=None, help="directory for new_schemes.json / .md")
    a = p.parse_args(argv)
    a.shapes = a.shapes or (DRY_SHAPES if a.dry_run else SHAPES)
    rows = run(a)
    info = dict(torch=torch.__version__, dry_run=a.dry_run,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "new_schemes.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
        (out / "new_schemes.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0 if all("error" not in r for r in rows if r["candidate"] != "stock compile") else 1


if __name__ == "__main__":
    sys.exit(main())
