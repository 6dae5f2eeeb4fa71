"""Dynamic FP8 activation quantizers as the libraries write them, after a norm: compile_norm
against stock torch.compile on the same hand-written code (H200; the lead runs it).

Each form takes the norm output ``y`` and returns ``(q, scale)`` computed as the library does
(the file / function each mirrors is named; vLLM and DeepSeek-V3 are not installed, their
code is written out). tests/test_quant_library_forms.py checks that each fuses and equals it.
Timing reuses the suite's method (gpu_check / BENCHMARKS.md: CUDA-graph replay, median, L2
flushed; ratio to a copy of the same element count).

    python benchmarks/quant_forms.py --out $OUT          # T 2048..16384 x H 4096, 5376 (< 3 min:
                                                         # compiles stop at --budget-s 160)
    python benchmarks/quant_forms.py --dry-run           # CPU, tiny shapes: fusion + checks only
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gpu_check as G  # noqa: E402
import suite  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)  # vLLM's _FP8_MIN_SCALING_FACTOR


def vllm_per_token(y):
    """vllm/model_executor/layers/quantization/input_quant_fp8.py, QuantFP8.forward_native,
    dynamic per-token branch (no scale_ub)."""
    x_max, _ = y.abs().max(dim=-1)
    x_max = x_max.unsqueeze(-1).to(torch.float32)
    scale = (x_max / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    out = (y.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return out, scale


def vllm_per_token_group(y, group_size=128):
    """vllm/model_executor/layers/quantization/input_quant_fp8.py, QuantFP8._quantize_group_native
    (hidden a multiple of the group: no padding; row-major scales)."""
    hidden = y.shape[-1]
    num_groups = hidden // group_size
    x_grouped = y.view(-1, num_groups, group_size)
    absmax = x_grouped.abs().max(dim=-1, keepdim=True)[0].float()
    scales = (absmax / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    x_quant = (x_grouped / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(-1, hidden)
    return x_quant, scales.reshape(y.shape[:-1] + (num_groups,))


def deepseek_act_quant(y, block_size=128):
    """DeepSeek-V3 inference/kernel.py, act_quant_kernel as torch: per block of 128, amax
    clamped to 1e-4, s = amax / 448, y / s cast to FP8 (no clamp)."""
    g = y.float().view(*y.shape[:-1], y.shape[-1] // block_size, block_size)
    amax = g.abs().amax(-1).clamp(min=1e-4)
    s = amax / 448.0
    return (g / s.unsqueeze(-1)).to(FP8).view(y.shape), s


def deepseek_act_quant_no_clamp(y, block_size=128):
    """DeepSeek-V3 inference/kernel.py's first act_quant (no clamp of amax)."""
    g = y.float().view(*y.shape[:-1], y.shape[-1] // block_size, block_size)
    s = g.abs().amax(-1) / 448.0
    return (g / s.unsqueeze(-1)).to(FP8).view(y.shape), s


def torchao_inference_row(y):
    """torchao quant_primitives._choose_scale_float8 + _quantize_affine_float8 (per row, no
    bounds): the scale computed in the activation's dtype."""
    scale = (y.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def torchao_training_row(y):
    """torchao float8_utils.tensor_to_scale (axiswise, dim -1) -> amax_to_scale (float64,
    EPS 1e-12) and hp_tensor_and_scale_to_float8 (multiply, to_fp8_saturated)."""
    amax = torch.amax(torch.abs(y), dim=-1, keepdim=True).to(torch.float64)
    scale = (FP8_MAX / torch.clamp(amax, min=1e-12)).to(torch.float32)
    return (y.to(torch.float32) * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def vllm_per_tensor(y):
    """vllm/model_executor/layers/quantization/input_quant_fp8.py, QuantFP8.forward_native,
    dynamic per-tensor branch (``scaled_fp8_quant`` without a scale, in PyTorch)."""
    x_max = y.abs().max().unsqueeze(-1).to(torch.float32)
    scale = (x_max / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    out = (y.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return out, scale


def torchao_inference_tensor(y):
    """torchao quant_primitives._choose_scale_float8 with block_size = y.shape (PerTensor) +
    _quantize_affine_float8: amax over every dim, the scale in the activation's dtype."""
    amax = y.abs().amax(dim=tuple(range(y.dim())), keepdim=True)
    scale = (amax / FP8_MAX).to(torch.float32)
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def torchao_training_tensor(y):
    """torchao float8_utils.tensor_to_scale (tensorwise: torch.max(torch.abs(y))) ->
    amax_to_scale (float64, EPS 1e-12) and hp_tensor_and_scale_to_float8 (multiply)."""
    amax = torch.max(torch.abs(y)).to(torch.float64)
    scale = (FP8_MAX / torch.clamp(amax, min=1e-12)).to(torch.float32)
    return (y.to(torch.float32) * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# (form, fused op, the scheme arguments the quant pass reads from it)
FORMS = [
    (vllm_per_token, "rms_norm_fp8_dynamic", dict(scale_form="multiply")),
    (vllm_per_token_group, "rms_norm_fp8_group", dict(group_size=128)),
    (deepseek_act_quant, "rms_norm_fp8_group", dict(min_scale=1e-4, clamp_amax=True)),
    (deepseek_act_quant_no_clamp, "rms_norm_fp8_group", dict(min_scale=None)),
    (torchao_inference_row, "rms_norm_fp8_dynamic", dict(min_scale=None, scale_in_x_dtype=True)),
    (torchao_training_row, "rms_norm_fp8_dynamic",
     dict(min_scale=1e-12, clamp_amax=True, scale_form="inverse")),
    (vllm_per_tensor, "rms_norm_fp8_dynamic_tensor", dict(scale_form="multiply")),
    (torchao_inference_tensor, "rms_norm_fp8_dynamic_tensor",
     dict(min_scale=None, scale_in_x_dtype=True)),
    (torchao_training_tensor, "rms_norm_fp8_dynamic_tensor",
     dict(min_scale=1e-12, clamp_amax=True, scale_form="inverse")),
]
SHAPES = "2048x4096,16384x4096,8192x5376,16384x5376"
BUDGET_S = 160.0  # compiles stop after this (the rows say "skipped"): the run stays < 3 min
DRY_SHAPES = "5x256"


def hand_written(form):
    """The Hugging Face norm followed by ``form``: what a model hands torch.compile."""
    def fn(x, w):
        return form(G.hf_rms(x, w))
    fn.__name__ = f"hf_rms_{form.__name__}"
    return fn


def run(shapes, dev: str, timing: bool, budget_s: float | None = None) -> list[dict]:
    rows, budget = [], suite.Budget(budget_s)
    for t, h in shapes:
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        w = torch.randn(h, device=dev, dtype=torch.bfloat16)
        copy_us = None
        if timing:
            dst = torch.empty_like(x)
            copy_us = G.graph_time_us(lambda: dst.copy_(x))
        # minimal bytes: x and w read, q written (1 byte), scales (small) ignored
        nbytes = 2 * t * h + 2 * h + t * h
        for form, fused_op, _ in FORMS:
            # a per-tensor scale needs every row's amax first: x is read twice at the least
            form_bytes = nbytes + (2 * t * h if fused_op.endswith("_tensor") else 0)
            fn = hand_written(form)
            want = fn(x, w)
            for name, kw in (("compile_norm", dict(backend="compile_norm")), ("stock compile", {})):
                row = dict(shape=f"{t}x{h}", form=form.__name__, candidate=name)
                if budget.spent():
                    rows.append({**row, "skipped": "time budget"})
                    continue
                try:
                    torch._dynamo.utils.counters["compile_norm"].clear()
                    c = torch.compile(suite.fresh(fn), dynamic=False, **kw)
                    got = c(x, w)
                    row["fusion"] = suite.compile_counters()
                    # codes as values: within one FP8 step of eager is expected
                    diff = (got[0].float() - want[0].float()).abs().nan_to_num(0)
                    row["q_max_diff"] = float(diff.max())
                    if timing:
                        us = G.graph_time_us(lambda: c(x, w))
                        bw = form_bytes / us / 1e3
                        row.update(graph_us=us, gbps=bw, ratio_to_copy=bw / (4 * t * h / copy_us / 1e3))
                except Exception as e:  # report and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    by = {(r["shape"], r["form"], r["candidate"]): r for r in rows}
    lines = ["| shape | form | compile_norm us | stock us | speedup | cn ratio to copy | fused |",
             "|---|---|---|---|---|---|---|"]
    for (shape, form, cand), r in by.items():
        if cand != "compile_norm":
            continue
        s = by.get((shape, form, "stock compile"), {})
        cn_us, st_us = r.get("graph_us"), s.get("graph_us")
        speed = f"{st_us / cn_us:.2f}x" if cn_us and st_us else "-"
        fused = r.get("fusion", {}).get("quant_matched", 0) if "fusion" in r else r.get("error", "-")
        lines.append(f"| {shape} | {form} | {cn_us or '-'} | {st_us or '-'} | {speed} | "
                     f"{r.get('ratio_to_copy', '-')} | {fused} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="", help=f"comma list of TxH (default {SHAPES})")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fusion and checks only")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop compiling after this")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    suite.raise_recompile_limits()
    suite.ensure_backend()
    shapes = suite.parse_shapes(a.shapes or (DRY_SHAPES if a.dry_run else SHAPES))
    t0 = time.time()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        rows = run(shapes, "cpu" if a.dry_run else "cuda", not a.dry_run, a.budget_s)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_forms.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "quant_forms.md").write_text(markdown(rows))
    print(f"== {len(rows)} rows in {time.time() - t0:.0f}s -> {out}", flush=True)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
