"""Benchmarks of the ops added by issue 13 part B (MXFP8, gated RMSNorm), with the suite's
method.

Families, each hand-written as the library / model writes it:

- ``rms_mxfp8[_rceil]``: a Hugging Face style RMSNorm (gpu_check.hf_rms) followed by torchao's
  own ``to_mx`` (float8_e4m3fn, blocks of 32, floor / rceil); minimal bytes: x (2 B/element)
  and the weight read, q (1 B) and one E8M0 byte per 32 written;
- ``rms_fp8_tensor``: an HF norm, then one dynamic FP8 scale for the whole tensor (the eager
  op is kernels/two_pass.py's two launches); minimal bytes: x read once, q written;
- ``gated_qwen3_next`` / ``gated_mamba2``: transformers' Qwen3NextRMSNormGated /
  MambaRMSNormGated forward (groups of 1024); minimal bytes: x and gate read, out written
  (6 B/element);
- ``gated_qwen3_next_fp8`` / ``gated_mamba2_fp8``: the same, followed by vLLM's native
  per-token FP8 (``rms_norm_gated_fp8_dynamic`` when fused); minimal bytes: x and gate read,
  q (1 B) and a scale per token written.

Candidates, side by side, on that code:

- ``compile_norm``: ``torch.compile(fn, backend="compile_norm")`` (its passes must fuse it into
  ``rms_norm_mxfp8`` / ``rms_norm_gated``: the counters are recorded);
- ``stock compile``: ``torch.compile(fn)``;
- ``compile_norm eager``: the op (the Triton kernel; per-tensor FP8: two launches of it);
- ``copy`` of the same element count (bf16).

Timing, checks and rows as benchmarks/suite.py (CUDA-graph replay, median, L2 flushed; the
copy timed in the same run). Under 3 minutes on an H200 with the defaults (the families other
than ``rms_mxfp8`` run at 8192 x 4096 / 5376 only).

    python benchmarks/new_schemes.py --out $OUT                  # T 2048..16384 x H 4096, 5376
    python benchmarks/new_schemes.py --dry-run                   # CPU: tiny shapes, checks only
    python benchmarks/new_schemes.py --families gated_qwen3_next,gated_qwen3_next_fp8 --out $OUT
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
from compile_norm.kernels import checking  # noqa: E402
from compile_norm.ops import registry  # noqa: E402

SHAPES = "2048x4096,8192x4096,16384x4096,2048x5376,8192x5376,16384x5376"
DRY_SHAPES = "5x2048,3x3072"
FAMILIES = ("rms_mxfp8", "rms_mxfp8_rceil", "gated_qwen3_next", "gated_mamba2",
            "gated_qwen3_next_fp8", "gated_mamba2_fp8", "rms_fp8_tensor")
# All but the default MXFP8 family only where the numbers matter most: the run stays < 3 min
FEW_SHAPES = ("8192x4096", "8192x5376")
MAMBA_GROUP = 1024  # Mamba-2's n_groups = 4 at 4096, ... (H / 1024 groups)


def hf_rms_mxfp8(x, w, mode: str):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    scales, q = to_mx(G.hf_rms(x, w), torch.float8_e4m3fn, 32, ScaleCalculationMode(mode))
    return q, scales


def hf_gated_qwen3_next(x, gate, w):
    """transformers' Qwen3NextRMSNormGated.forward, as written there."""
    xf = x.float()
    y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + G.EPS)).to(x.dtype)
    return (y * torch.nn.functional.silu(gate.float())).to(x.dtype)


def hf_gated_mamba2(x, gate, w):
    """transformers' MambaRMSNormGated.forward (group_size MAMBA_GROUP), as written there."""
    z = x.float() * torch.nn.functional.silu(gate.float())
    zg = z.view(*z.shape[:-1], z.shape[-1] // MAMBA_GROUP, MAMBA_GROUP)
    y = (zg * torch.rsqrt(zg.pow(2).mean(-1, keepdim=True) + G.EPS)).view(z.shape)
    return w * y.to(x.dtype)


def fp8_per_token(y):
    """vLLM's native per-token dynamic FP8 (scaled_fp8_quant's PyTorch reference)."""
    yf = y.float()
    s = (yf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return (yf / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s


def hf_fp8_tensor(x, w):
    """Per-tensor dynamic FP8 of an HF norm's output (torchao's tensorwise recipe)."""
    y = G.hf_rms(x, w).float()
    s = (y.abs().amax() / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return (y / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s


def family(t: int, h: int, dev: str, fam: str) -> dict:
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(torch.bfloat16)
    n = t * h
    if fam.startswith("gated_"):
        gate = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        before = fam.startswith("gated_mamba2")
        hf = hf_gated_mamba2 if before else hf_gated_qwen3_next
        args = (x, gate, w, G.EPS, not before, MAMBA_GROUP if before else None)
        if fam.endswith("_fp8"):  # the fused op's arguments: the norm's, the scheme's defaults
            fused = registry.spec("rms_norm_gated_fp8_dynamic").bind(
                args[:4], dict(norm_before_gate=args[4], norm_group_size=args[5]))
            return dict(hf=lambda a, g, b: fp8_per_token(hf(a, g, b)), args=(x, gate, w),
                        bytes=5 * n + 4 * t + 2 * h, ref_op=("rms_norm_gated_fp8_dynamic", fused),
                        op=lambda: torch.ops.compile_norm.rms_norm_gated_fp8_dynamic(*fused))
        return dict(
            hf=hf, args=(x, gate, w),
            bytes=6 * n + 2 * h, op=lambda: torch.ops.compile_norm.rms_norm_gated(*args),
            ref_op=("rms_norm_gated", args))
    if fam == "rms_fp8_tensor":  # minimal bytes: x read once, q written (two passes read x twice)
        return dict(hf=hf_fp8_tensor, args=(x, w), bytes=3 * n + 2 * h,
                    op=lambda: torch.ops.compile_norm.rms_norm_fp8_dynamic_tensor(x, w, G.EPS),
                    ref_op=("rms_norm_fp8_dynamic_tensor", (x, w, G.EPS)))
    mode = "rceil" if fam.endswith("_rceil") else "floor"
    return dict(
        hf=(lambda a, b: hf_rms_mxfp8(a, b, mode)), args=(x, w), bytes=3 * n + n // 32 + 2 * h,
        op=lambda: torch.ops.compile_norm.rms_norm_mxfp8(x, w, G.EPS, 32, mode),
        ref_op=("rms_norm_mxfp8", (x, w, G.EPS, 32, mode)))


def _check(ref_op, fn) -> str:
    """'ok' or the problems, by checking.compare (the suite's check; the gated norm's
    tolerances follow the placement of its gate)."""
    op, args = ref_op
    spec = registry.spec(op)
    if not spec.gated:
        return G._check_candidate(ref_op, fn)
    pos = checking.positional(op, args, {})
    res = checking.compare(op, fn(), registry.ops()[op].reference(*pos), torch.bfloat16,
                           gate_before=not spec.split(pos).norm_before_gate)
    return "ok" if res.ok else "; ".join(res.problems)[:120]


def run(a) -> list[dict]:
    dev = "cpu" if a.dry_run else "cuda"
    S.raise_recompile_limits()
    S.ensure_backend()
    budget = S.Budget(a.budget_s)
    rows: list[dict] = []
    for t, h in S.parse_shapes(a.shapes):
        shape = f"{t}x{h}"
        copy_us = None if a.dry_run else S.copy_row(rows, t, h, dev)
        for fam in a.families:
            if fam != "rms_mxfp8" and not a.dry_run and shape not in FEW_SHAPES:
                continue
            if fam.startswith("gated_mamba2") and h % MAMBA_GROUP:  # groups must divide the row
                continue
            spec = family(t, h, dev, fam)
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
                S.measure(row, make, lambda fn: _check(spec["ref_op"], fn), is_compiled,
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
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list, of: " + ", ".join(FAMILIES))
    p.add_argument("--out", default=None, help="directory for new_schemes.json / .md")
    a = p.parse_args(argv)
    a.shapes = a.shapes or (DRY_SHAPES if a.dry_run else SHAPES)
    a.families = [f for f in a.families.split(",") if f]
    unknown = sorted(set(a.families) - set(FAMILIES))
    if unknown:
        p.error(f"--families: unknown {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    # compile for real (as suite.py without --cache): the passes run and their counters prove the fusion
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
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
