"""Training benchmarks (issue 12): forward + backward of the norms, and a model training step.

1. fwd+bwd of rms_norm, of fused add + rms_norm and of Gemma's norm -> add -> norm on the
   Hugging Face style code (gpu_check.hf_rms / hf_add, ``hf_gemma_sandwich``), bf16, per shape: ``compile_norm`` backend (``lowering="auto"``
   and ``"kernel"``: the Triton backward kernels everywhere), stock ``torch.compile``, the eager ops (``compile_norm eager``: Triton forward + backward kernels),
   Liger (if importable). Each candidate is checked against fp32 autograd first, then one
   training step (``torch.autograd.grad``) is captured in a CUDA graph; the replays of every
   candidate's graph and of a copy of the same element count are timed in turn
   (``lowerings.measure.replay_time_us``, ``ROUNDS`` rounds, median), so that the card's
   clock drift over a run is shared by every candidate, as in the model steps. Minimal
   bytes per element (bf16): rms_norm 10 (forward reads x, writes y; backward reads dy and x,
   writes dx), fused add 16 (forward reads x and r, writes y and h; backward reads dy, dh and h,
   writes dx, which is also dr), the sandwich 20 (``sandwich_bwd_family``); ratio = bandwidth /
   copy's (4 bytes per element).
2. A training step (forward, loss, backward) of Hugging Face Llama (Llama-3-8B shapes) and
   Gemma 3 (12B shapes), a few layers, bf16: compile_norm backend vs stock compile, median of
   CUDA-event timed steps, with the compile_norm counters of the compile; then where each
   step's time goes (``kernel_profile.profile``): the time in norm kernels, forward and
   backward, and their share of the step and of its kernel time, time in gemm / attention /
   other, and the top 10 kernels of each candidate (training.md has the tables).

    python benchmarks/training.py --out $OUT          # quick shape set, < 4 min on an H200
    python benchmarks/training.py --full --out $OUT   # T 256..16384 x every H
    python benchmarks/training.py --no-ops --models llama --out $OUT   # one model step only
    python benchmarks/training.py --dry-run           # CPU: tiny shapes and models, checks only
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402  (HF style functions, timers)
import kernel_profile as KP  # noqa: E402  (where a step's time goes)
import suite as S  # noqa: E402  (backend registration, Liger, fresh(), fwd+bwd of rms_norm)

from compile_norm.lowerings.measure import capture_graph, replay_time_us  # noqa: E402

QUICK_SHAPES = "256x4096,2048x2048,2048x5376,8192x4096,16384x8192,16384x5376,65536x128"
FULL_T = (256, 2048, 8192, 16384)
FULL_H = (2048, 3584, 4096, 5376, 8192)
DRY_SHAPES = "5x256,3x384"
MODELS = {
    "llama": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128),
    "gemma3_text": dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, sliding_window=1024),
}
DRY_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)


def add_bwd_family(t: int, h: int, dev: str) -> dict:
    """fused add + rms_norm forward + backward (dx, dr, dw); minimal bytes 16 per element."""
    bf16 = torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=bf16, requires_grad=True)
    r = torch.randn(t, h, device=dev, dtype=bf16, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(bf16).requires_grad_()
    dy = torch.randn(t, h, device=dev, dtype=bf16)
    dh = torch.randn(t, h, device=dev, dtype=bf16)

    def train_step(f):
        return lambda: torch.autograd.grad(f(x, r, w), (x, r, w), (dy, dh))

    def reference():
        xf, rf, wf = (a.detach().float().requires_grad_() for a in (x, r, w))
        return torch.autograd.grad(G.hf_add(xf, rf, wf), (xf, rf, wf), (dy.float(), dh.float()))

    return dict(step=train_step, hf=G.hf_add, bytes=16 * t * h + 4 * h, reference=reference,
                op=lambda a, b, c: torch.ops.compile_norm.fused_add_rms_norm(a, b, c, G.EPS))


def hf_gemma_sandwich(x, r, w1, w2):
    """Gemma 2 / 3's decoder layer between two sublayers: the sublayer output normalized,
    added to the residual stream, the sum normalized for the next sublayer."""
    h = r + G.hf_gemma(x, w1)
    return G.hf_gemma(h, w2), h


def sandwich_bwd_family(t: int, h: int, dev: str) -> dict:
    """norm -> residual add -> norm, forward + backward (dx, dr, dw1, dw2); minimal bytes 20
    per element: the forward reads x and r, writes y and h; the backward reads dy, dh, h and
    x, writes dx and dr (compile_norm's two backward kernels also write and re-read the sum's
    gradient: 24)."""
    bf16 = torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=bf16, requires_grad=True)
    r = torch.randn(t, h, device=dev, dtype=bf16, requires_grad=True)
    w1, w2 = ((0.1 * torch.randn(h, device=dev)).to(bf16).requires_grad_() for _ in range(2))
    dy = torch.randn(t, h, device=dev, dtype=bf16)
    dh = torch.randn(t, h, device=dev, dtype=bf16)

    def train_step(f):
        return lambda: torch.autograd.grad(f(x, r, w1, w2), (x, r, w1, w2), (dy, dh))

    def reference():
        args = [a.detach().float().requires_grad_() for a in (x, r, w1, w2)]
        return torch.autograd.grad(hf_gemma_sandwich(*args), args, (dy.float(), dh.float()))

    def op(a, b, c, d):
        return torch.ops.compile_norm.rms_norm_add_rms_norm(a, b, c, G.EPS, d, G.EPS, 1.0, 1.0)

    return dict(step=train_step, hf=hf_gemma_sandwich, bytes=20 * t * h + 8 * h,
                reference=reference, op=op)


OP_FAMILIES = {"rms_bwd": S.bwd_family, "add_rms_bwd": add_bwd_family,
               "sandwich_bwd": sandwich_bwd_family}


def op_candidates(fam: str, t: int, h: int, dev: str, compile_: bool) -> tuple[list, dict]:
    spec = OP_FAMILIES[fam](t, h, dev)
    ref = spec["reference"]()
    cands = []
    if compile_:
        for name, kw in (("compile_norm", dict(backend="compile_norm")),
                         ("compile_norm kernel", dict(backend="compile_norm", options={"lowering": "kernel"})),
                         ("stock compile", {})):
            cands.append((name, lambda kw=kw: spec["step"](torch.compile(S.fresh(spec["hf"]), dynamic=False, **kw)), True))
    cands.append(("compile_norm eager", lambda: spec["step"](spec["op"]), False))
    lig = S.liger() if dev == "cuda" else None
    if lig is not None and fam == "rms_bwd":
        cands.append(("Liger", lambda: spec["step"](lambda a, b: lig[0].apply(a, b, G.EPS, 0.0, "llama", False)), False))
    elif lig is not None and lig[1] is not None and fam == "add_rms_bwd":
        cands.append(("Liger", lambda: spec["step"](lambda a, b, c: lig[1].apply(a, b, c, G.EPS, 0.0, "llama", False)), False))
    return [(n, make, (lambda fn, ref=ref: S.check_grads(fn(), ref)), c) for n, make, c in cands], spec


ROUNDS = 5  # rounds of the op rows' replays, every candidate's once a round


def run_ops(a) -> list[dict]:
    rows = []
    budget = S.Budget(a.budget_s)
    for t, h in a.shape_list:
        shape = f"{t}x{h}"
        # (family, candidate) or "copy" -> (captured CUDA graph, the function it replays: kept
        # alive, as the graph reads the tensors that function holds)
        graphs = {}
        if a.timing:
            src = torch.randn(t, h, device=a.device, dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            copy = lambda: dst.copy_(src)  # noqa: E731
            graphs["copy"] = (capture_graph(copy), copy)
        print(f"== {shape}", flush=True)
        timed = []  # (row, bytes)
        for fam in a.family_list:
            cands, spec = op_candidates(fam, t, h, a.device, not a.no_compile)
            for name, make, check, is_compiled in cands:
                row = dict(shape=shape, family=fam, candidate=name)
                rows.append(row)
                if is_compiled and budget.spent():
                    row["skipped"] = "time budget"
                    continue
                try:
                    torch._dynamo.utils.counters["compile_norm"].clear()
                    fn = make()
                    row["check"] = check(fn)  # the first call compiles
                    if is_compiled:
                        row["fusion"] = S.compile_counters()
                    if a.timing:
                        graphs[(fam, name)] = (capture_graph(fn), fn)
                        timed.append((row, spec["bytes"]))
                except Exception as e:  # report and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
        if a.timing:
            us = medians_in_turn({k: (lambda g=g: replay_time_us(g)) for k, (g, _) in graphs.items()}, ROUNDS)
            copy_us = us.pop("copy")
            print(f"   copy {copy_us:.1f} us", flush=True)
            for row, nbytes in timed:
                v = us[(row["family"], row["candidate"])]
                bw = nbytes / v / 1e3
                row.update(us=round(v, 2), gbps=round(bw, 1), ratio=round(bw / (4 * t * h / copy_us / 1e3), 3))
        graphs.clear()
        for row in rows:
            if row["shape"] == shape:
                print("   " + json.dumps(row), flush=True)
    return rows


def model_step_fn(model, ids):
    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        # next-token labels: with tied embeddings (Gemma) the own token would be trivially
        # predicted (loss 0 in bf16, run 21)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return loss
    return step


def time_step_ms(step, params) -> float:
    for p in params:
        p.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def medians_in_turn(timers: dict, n: int) -> dict:
    """{name: median of n calls of its timer}, the timers called in turn (A B A B ...): the
    card's clocks drift over a run (run 28: the same GEMMs 2% slower for the candidate timed
    second), so timing one candidate after the other would charge the drift to one."""
    times = {name: [] for name in timers}
    for _ in range(n):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile_step(step, params, a) -> tuple[dict, KP.Profile]:
    """The step's kernels by category: the norm kernels' time (forward + backward) and share."""
    def fresh_step():
        for p in params:
            p.grad = None
        step()

    prof = KP.profile(fresh_step, a.device, iters=a.profile_iters)
    norm, phases = prof.by_category()["norm"], prof.phases("norm")
    return dict(norm_us=round(norm["us"], 1), norm_fwd_us=round(phases["forward"], 1),
                norm_bwd_us=round(phases["backward"], 1), norm_share_of_kernels=round(norm["share"], 4),
                kernels_us=round(prof.total_us, 1), profile=prof.to_json(top=10)), prof


def run_models(a) -> list[dict]:
    import transformers

    rows = []
    for model_type in a.model_list:
        cfg = dict(DRY_MODEL if a.dry_run else MODELS[model_type])
        if a.dry_run:
            cfg.pop("sliding_window", None)
        config = transformers.AutoConfig.for_model(
            model_type, num_hidden_layers=a.layers, vocab_size=a.vocab,
            max_position_embeddings=max(a.seq, 64), **cfg)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager" if a.dry_run else "sdpa")
        model = model.to(device=a.device, dtype=torch.bfloat16).train()
        params = list(model.parameters())
        ids = torch.randint(0, a.vocab, (1, a.seq), device=a.device)
        candidates = [("stock compile", {}), ("compile_norm", dict(backend="compile_norm"))]
        if a.model_options:  # a trade-off next to the default (e.g. eager's roundings off)
            candidates.append((f"compile_norm {a.model_options}",
                               dict(backend="compile_norm", options=json.loads(a.model_options))))
        torch._dynamo.reset()
        compiled, model_rows = {}, []
        for name, kw in candidates:  # every candidate compiled (side by side), then timed in turn
            row = dict(model=model_type, layers=a.layers, tokens=a.seq, candidate=name)
            model_rows.append(row)
            if a.total_budget.spent():
                row["skipped"] = "time budget (--total-budget-s)"
                continue
            try:
                torch._dynamo.utils.counters["compile_norm"].clear()
                t0 = time.time()
                step = model_step_fn(torch.compile(model, dynamic=False, **kw), ids)
                with KP.naming(a.device):  # the kernel names kernel_profile reads
                    row["loss"] = float(step())  # compiles
                row["compile_s"] = round(time.time() - t0, 1)
                if name.startswith("compile_norm"):
                    row["fusion"] = S.compile_counters()
                compiled[name] = step
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        timers = {name: (lambda s=step: time_step_ms(s, params)) for name, step in compiled.items()}
        medians = medians_in_turn(timers, a.steps) if a.timing else {}
        for row in model_rows:
            step = compiled.get(row["candidate"])
            if step is not None:
                if a.timing:
                    row["step_ms"] = round(medians[row["candidate"]], 3)
                try:
                    summary, a.profiles[(model_type, row["candidate"])] = profile_step(step, params, a)
                    row.update(summary)
                    if a.timing:
                        row["norm_share_of_step"] = round(row["norm_us"] / (row["step_ms"] * 1e3), 4)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print("   " + json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        stock, ours = (r.get("step_ms") for r in rows[-len(candidates):][:2])
        if stock and ours:
            rows[-len(candidates) + 1]["speedup_vs_stock"] = round(stock / ours, 3)
            print(f"   {model_type}: {stock / ours:.3f}x stock", flush=True)
    return rows


def models_markdown(rows: list[dict], profiles: dict) -> str:
    """The model steps: time, norm kernels' time and share, then each model's profile tables."""
    lines = ["# Training steps: where the time goes", "",
             "Norm: compile_norm's and Inductor's norm kernels, forward and backward "
             "(benchmarks/kernel_profile.py says how they are recognised).", "",
             "| model | candidate | step ms | x stock | norm us (fwd / bwd) | norm / kernels | norm / step | fusion |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.get("skipped") or r.get("error")
        if status:
            lines.append(f"| {r['model']} | {r['candidate']} | {status[:80]} | | | | | |")
            continue
        fusion = ", ".join(f"{k}={v}" for k, v in (r.get("fusion") or {}).items() if k.endswith("matched"))
        share = r.get("norm_share_of_step")
        lines.append(f"| {r['model']} | {r['candidate']} | {r.get('step_ms', '-')} | "
                     f"{r.get('speedup_vs_stock', '-')} | {r['norm_us']} ({r['norm_fwd_us']} / {r['norm_bwd_us']}) | "
                     f"{r['norm_share_of_kernels']:.1%} | "
                     f"{'-' if share is None else f'{share:.1%}'} | {fusion} |")
    for model in dict.fromkeys(m for m, _ in profiles):
        profs = {c: p for (m, c), p in profiles.items() if m == model}
        steps = {r["candidate"]: r.get("step_ms") for r in rows if r["model"] == model}
        lines += ["", f"## {model}", ""] + KP.markdown(profs, top=10, step_ms=steps)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every T x H (and H=128 rows)")
    p.add_argument("--shapes", help="TxH,... (overrides the set)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, checks only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-model", action="store_true", help="skip the model training steps")
    p.add_argument("--no-ops", action="store_true", help="skip the op rows (model steps only)")
    p.add_argument("--families", default=",".join(OP_FAMILIES),
                   help=f"op rows: comma list of {','.join(OP_FAMILIES)}")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    p.add_argument("--profile-iters", type=int, default=3, help="profiled steps per model candidate")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model-options", default="", help="JSON backend options of a third model "
                   "candidate, e.g. '{\"emulate_precision_casts\": false}'")
    p.add_argument("--budget-s", type=float, default=90.0, help="compile budget of the op rows")
    p.add_argument("--total-budget-s", type=float, default=200.0,
                   help="no model compile starts after this (the run stays under 4 min)")
    p.add_argument("--out", help="folder for training.json")
    a = p.parse_args(argv)
    a.family_list = [f for f in a.families.split(",") if f]
    if not a.family_list or any(f not in OP_FAMILIES for f in a.family_list):
        p.error(f"--families: expected a comma list of {', '.join(OP_FAMILIES)}, got {a.families!r}")
    a.model_list = [m for m in a.models.split(",") if m]
    if not a.model_list or any(m not in MODELS for m in a.model_list):
        p.error(f"--models: expected a comma list of {', '.join(MODELS)}, got {a.models!r}")
    a.profiles = {}
    a.device = "cpu" if a.dry_run else "cuda"
    a.timing = not a.dry_run
    if a.dry_run:
        a.seq, a.vocab, a.steps = 12, 128, 1
    if a.shapes:
        text = a.shapes
    elif a.dry_run:
        text = DRY_SHAPES
    elif a.full:
        text = ",".join([f"{t}x{h}" for h in FULL_H for t in FULL_T] + [f"{32 * t}x128" for t in FULL_T])
    else:
        text = QUICK_SHAPES
    a.shape_list = S.parse_shapes(text)
    S.raise_recompile_limits()
    S.ensure_backend()
    a.total_budget = S.Budget(None if a.dry_run else a.total_budget_s)
    t0 = time.time()
    # compile for real: the passes run (and their counters prove the fusion) every time
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        result = dict(ops=[] if a.no_ops else run_ops(a), models=[] if a.no_model else run_models(a),
                      env=S.env_info(a.dry_run), wall_s=None)
    result["wall_s"] = round(time.time() - t0, 1)
    print(f"done in {result['wall_s']} s", flush=True)
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "training.md").write_text(models_markdown(result["models"], a.profiles))
    failed = [r for r in result["ops"] + result["models"] if "error" in r or r.get("check", "ok") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
