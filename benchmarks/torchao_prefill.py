"""Issue 13's target: a torchao FP8 Llama prefill, compile_norm vs stock torch.compile.

A Hugging Face ``LlamaForCausalLM`` with Llama-3-8B shapes (hidden 4096, intermediate 14336,
32 heads, 8 kv heads, head_dim 128; ``--layers`` 2, vocab 32768), bf16, SDPA attention,
quantized with torchao ``quantize_(model, Float8DynamicActivationFloat8WeightConfig(
granularity=PerRow()))`` and, as a second configuration, ``PerTensor()`` (every linear,
``lm_head`` included: torchao's default filter). Prefill of batch 1 x T tokens under
``torch.no_grad()``. Candidates, each a fresh ``dynamic=False`` compile (no FX graph / AOT
cache: a hit would run no pass and leave the counters empty): ``backend="compile_norm"`` and
stock ``torch.compile`` (Inductor).

The configs take ``set_inductor_config=False`` unless ``--torchao-inductor-config``: by default
``quantize_`` turns on Inductor's coordinate-descent tuning for the whole process
(``torchao.quantization.utils.recommended_inductor_config_setter``), for both candidates'
generated kernels. On the H200 host that tuning took 294 of a 1-layer compile's 312 s (run 32
in RESULTS.md), so two candidates cannot compile within one device call; without it both
compile with Inductor's defaults, as any other model does.

For each:
- logits against eager, as relative L2 error ``|a - b| / |b|``: compile_norm passes at
  <= 3 % or no worse than stock Inductor + 25 % (``e2e_fp8_layer.close_enough``: compiled code
  may round an FP8 code one step away from eager's where it keeps float32; stock's error is
  reported as the baseline);
- the compile_norm counters (``torch._dynamo.utils.counters["compile_norm"]``) against the
  model's sites: 2 norms per layer + the final norm (``canonicalize_matched``), 2 residual adds
  per layer (the first layer's input norm has none, the final norm has one:
  ``residual_matched``), one activation quantization per norm whose output feeds a quantized
  linear (``quant_matched``); every ``<pass>_unmatched: <reason>`` is printed and kept;
- end-to-end time: CUDA-graph replay (``lowerings.measure``, median of 5 rounds), CUDA
  events if the graph cannot be captured; both candidates stay compiled and are timed in
  turn, so a drift of the card's clocks does not fall on one of them;
- where the time goes: ``kernel_profile.profile`` (norm, quant, gemm, attention, other;
  ``norm`` holds compile_norm's norm + quant kernels and stock's norm kernels, ``quant`` the
  quantizations no norm absorbed), the top 10 kernels of each.

Writes results.json and results.md into --out (default $OUT or ./out).

    python benchmarks/torchao_prefill.py --out $OUT            # H200: < 4 min (--budget-s)
    python benchmarks/torchao_prefill.py --dry-run --out DIR   # CPU: tiny model, checks only

On the CPU: torchao's ``quantize_`` refuses to quantize without an FP8-capable GPU
(``quant_api._check_hardware_support``, a check about its matmul); the dry run lifts that
check (and only on the CPU), as the activation quantization is plain torch and
``torch._scaled_mm`` runs on the CPU: torch 2.13 takes per-row and per-tensor scales, torch
2.11 per-tensor only. Where the CPU cannot run a configuration (PerRow on 2.11), eager and the
compiled model fail at run time, after the compile: the dry run then checks what it can, the
fusion counters of the compiled graph, and says "not run" with the error.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import e2e_fp8_layer as E  # noqa: E402  (compile_one, rel_err, close_enough)
import kernel_profile as KP  # noqa: E402
import suite as S  # noqa: E402  (backend registration, recompile limits, budget, env)
import training as T  # noqa: E402  (the Llama-3-8B shapes, the tiny config, CUDA-event timer)

from compile_norm.lowerings import measure  # noqa: E402

GRANULARITIES = ("per_row", "per_tensor")
CANDIDATES = (("compile_norm", "compile_norm"), ("stock compile", "inductor"))
DRY_TOKENS = "12"


def granularity(name: str):
    from torchao.quantization import PerRow, PerTensor

    return {"per_row": PerRow, "per_tensor": PerTensor}[name]()


def build(layers: int, vocab: int, max_tokens: int, device: str, dry: bool) -> torch.nn.Module:
    """The bf16 Llama, norm weights drawn around 1 (HF initializes them to exactly 1)."""
    import transformers

    config = transformers.AutoConfig.for_model(
        "llama", num_hidden_layers=layers, vocab_size=vocab, use_cache=False,
        max_position_embeddings=max(max_tokens, 64), **(T.DRY_MODEL if dry else T.MODELS["llama"]))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def quantized(model: torch.nn.Module, gran: str, device: str,
              inductor_config: bool = False) -> torch.nn.Module:
    """A quantized copy; ``inductor_config``: let torchao set its Inductor config (see above)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quant_api, quantize_

    model = copy.deepcopy(model)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity(gran),
                                                       set_inductor_config=inductor_config)
    if device == "cpu":  # see the docstring: torchao's GPU check guards its matmul only
        check = quant_api._check_hardware_support
        quant_api._check_hardware_support = lambda granularity: None
        try:
            quantize_(model, config)
        finally:
            quant_api._check_hardware_support = check
    else:
        quantize_(model, config)
    return model


def expected_sites(model: torch.nn.Module) -> dict[str, int]:
    """The counters a complete fusion gives: every norm, every residual add in front of one,
    every activation quantization of a norm output (torchao replaces a quantized linear's
    weight by a tensor subclass)."""
    layers = len(model.model.layers)
    head_quantized = type(model.lm_head.weight) not in (torch.Tensor, torch.nn.Parameter)
    return {"canonicalize_matched": 2 * layers + 1, "residual_matched": 2 * layers,
            "quant_matched": 2 * layers + int(head_quantized)}


def reasons(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if ": " in k}


def prefill_times_ms(fns: dict, rounds: int = 5) -> dict[str, tuple[float, str]]:
    """{candidate: (median ms, how)}: CUDA-graph replay (CUDA events where capture fails),
    the candidates measured in turn (``training.medians_in_turn``)."""
    graphs = {}
    for name, fn in fns.items():
        try:
            graphs[name] = measure.capture_graph(fn)
        except Exception as e:  # capture refused (a host sync, a non-capturable op)
            print(f"   {name}: cuda graph capture failed ({type(e).__name__}: {str(e)[:120]}); "
                  "CUDA events", flush=True)
    timers = {name: (lambda g=graphs[name]: measure.replay_time_us(g) / 1e3) if name in graphs
              else (lambda f=fn: T.time_step_ms(f, [])) for name, fn in fns.items()}
    return {name: (ms, "cuda graph" if name in graphs else "cuda events")
            for name, ms in T.medians_in_turn(timers, rounds).items()}


_START = time.time()


def progress(what: str) -> None:
    """A timestamped line per phase: a run cut by its time limit says where it was."""
    print(f"   [{time.time() - _START:6.1f} s] {what}", flush=True)


def compile_candidate(model, ids, ref, backend: str, a) -> tuple[dict, object]:
    """Compile and check one candidate: (its row, the compiled model or None); errors are
    kept in the row, not raised."""
    row: dict = {}
    t0 = time.time()
    progress(f"compiling with {backend}")
    try:
        with KP.naming(a.device):
            fn, fused, kernels = E.compile_one(model, (ids,), backend, fullgraph=False)
        row.update(compile_s=round(time.time() - t0, 1), generated_kernels=len(kernels))
    except Exception as e:  # on the CPU: a configuration its _scaled_mm cannot run
        row.update(not_run=f"{type(e).__name__}: {e}"[:300], fused=S.compile_counters())
        return row, None
    row["fused"] = fused
    try:
        out = fn(ids).logits
        if ref is not None:
            row["rel_err_vs_eager"] = E.rel_err(out, ref)
        del out
    except Exception as e:  # report and go on: the other rows still run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row, None
    return row, fn


def run(a) -> list[dict]:
    budget = S.Budget(a.budget_s)
    progress("building the model")
    base = build(a.layers, a.vocab, max(a.token_list), a.device, a.dry_run)
    rows = []
    for gran in a.gran_list:
        progress(f"quantizing ({gran})")
        model = quantized(base, gran, a.device, a.torchao_inductor_config)
        expected = expected_sites(model)
        for tokens in a.token_list:
            ids = torch.randint(0, a.vocab, (1, tokens), device=a.device,
                                generator=torch.Generator(a.device).manual_seed(tokens))
            row: dict = dict(granularity=gran, tokens=tokens, expected=expected)
            progress(f"eager reference, T={tokens}")
            try:
                with torch.no_grad():
                    ref = model(ids).logits
            except Exception as e:
                ref, row["eager"] = None, f"not run: {type(e).__name__}: {e}"[:300]
            torch._dynamo.reset()  # once per row: the candidates stay compiled side by side
            fns = {}
            for name, backend in a.candidate_list:
                if budget.spent():
                    row[name] = {"skipped": "time budget (--budget-s)"}
                    continue
                with torch.no_grad():
                    row[name], fn = compile_candidate(model, ids, ref, backend, a)
                if fn is not None:
                    fns[name] = fn
            with torch.no_grad():
                if a.timing and fns:
                    progress("timing (candidates in turn)")
                    for name, (ms, how) in prefill_times_ms({n: (lambda f=f: f(ids)) for n, f in fns.items()}).items():
                        row[name].update(ms=ms, timer=how)
                for name, fn in fns.items():
                    progress(f"profiling {name}")
                    try:
                        prof = KP.profile(lambda: fn(ids), a.device, iters=a.profile_iters)
                        row[name].update(profile=prof.to_json(top=10), _profile=prof)
                    except Exception as e:  # report and go on
                        row[name]["error"] = f"{type(e).__name__}: {e}"[:300]
            for name, _ in CANDIDATES:
                row.setdefault(name, {"skipped": "not in --candidates"})
                shown = {k: v for k, v in row[name].items() if k not in ("profile", "_profile")}
                if "profile" in row[name]:  # kernel us per category
                    shown["us"] = {c: round(v["us"], 1) for c, v in row[name]["profile"]["by_category"].items()}
                print(f"{gran:<10} T={tokens:<5} {name:<13} " + json.dumps(shown), flush=True)
            judge(row)
            rows.append(row)
        del model
    return rows


def judge(row: dict) -> None:
    """Fusion and numerics verdicts of one (granularity, tokens) row, printed."""
    cn, stock = row["compile_norm"], row["stock compile"]
    if "skipped" in cn:
        return
    fused = cn.get("fused", {})
    row["fusion_ok"] = all(fused.get(k, 0) == v for k, v in row["expected"].items())
    row["reasons"] = reasons(fused)
    if "rel_err_vs_eager" in cn:  # judged against stock's error; without it only the bound decides
        err, baseline = cn["rel_err_vs_eager"], stock.get("rel_err_vs_eager")
        row["numerics_ok"] = (E.close_enough(err, baseline) if baseline is not None
                              else True if err <= E.MAX_REL_ERR else None)
        if row["numerics_ok"] is None:
            print(f"   rel err {err:.3g} > {E.MAX_REL_ERR} and stock did not run: numerics not judged", flush=True)
    if cn.get("ms") and stock.get("ms"):
        row["speedup_vs_stock"] = round(stock["ms"] / cn["ms"], 3)
    got = ", ".join(f"{k.split('_')[0]} {fused.get(k, 0)}/{v}" for k, v in row["expected"].items())
    print(f"   fused (got/expected): {got}" + ("" if row["fusion_ok"] else f"; reasons: {row['reasons']}")
          + (f"; {row['speedup_vs_stock']:.3f}x stock" if "speedup_vs_stock" in row else ""), flush=True)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# torchao FP8 Llama prefill ({meta['shape']}, {meta['layers']} layers)", "",
             f"{meta['env'].get('device', 'CPU dry run')}, torch {meta['env']['torch']}, torchao "
             f"{meta['torchao']}, transformers {meta['transformers']}, {meta['env']['date']}; Inductor's "
             f"coordinate-descent tuning {'on' if meta['coordinate_descent_tuning'] else 'off'} "
             f"(torchao's Inductor config {'set' if meta['torchao_inductor_config'] else 'not set'})", "",
             "Fused: compile_norm counters got / the model's sites (norms, residual adds, activation "
             "quantizations). Rel err: logits against eager, relative L2. Kernel time per category "
             "from torch.profiler (benchmarks/kernel_profile.py); norm holds the norm (+ quant) "
             "kernels, quant the quantizations no norm absorbed.", "",
             "| granularity | T | cn ms | stock ms | speedup | fused norms / adds / quants | rel err cn / stock "
             "| norm+quant us cn / stock | gemm us cn / stock | attention us cn / stock | other us cn / stock |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cat(r, c):
        by = r.get("profile", {}).get("by_category", {})
        return sum(by[k]["us"] for k in c) if by else None

    def pair(a, b, spec=".1f"):
        return " / ".join(format(v, spec) if isinstance(v, (int, float)) else "-" for v in (a, b))

    for r in rows:
        cn, st = r["compile_norm"], r["stock compile"]
        fused = cn.get("fused", {})
        got = " / ".join(f"{fused.get(k, 0)}/{v}" for k, v in r["expected"].items())
        cells = [pair(cn.get("ms"), st.get("ms"), ".3f").replace(" / ", " | "),
                 f"{r['speedup_vs_stock']:.3f}x" if "speedup_vs_stock" in r else "-", got,
                 pair(cn.get("rel_err_vs_eager"), st.get("rel_err_vs_eager"), ".2e")]
        cells += [pair(cat(cn, c), cat(st, c)) for c in (("norm", "quant"), ("gemm",), ("attention",), ("other",))]
        lines.append(f"| {r['granularity']} | {r['tokens']} | " + " | ".join(cells) + " |")
    for r in rows:
        profs = {n: r[n]["_profile"] for n, _ in CANDIDATES if "_profile" in r[n]}
        lines += ["", f"## {r['granularity']}, T={r['tokens']}", ""]
        if r.get("reasons"):
            lines += [f"Not fused: {r['reasons']}", ""]
        for n, _ in CANDIDATES:
            for key in ("not_run", "skipped", "error"):
                if key in r[n]:
                    lines += [f"{n}: {key.replace('_', ' ')}: {r[n][key]}", ""]
        if profs:
            lines += KP.markdown(profs, top=10, step_ms={n: r[n].get("ms") for n in profs})
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None, help="comma list of T (default 2048,8192; dry run 12)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None, help="default 32768 (dry run 128)")
    p.add_argument("--granularity", default=",".join(GRANULARITIES), help="comma list of per_row,per_tensor")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=200.0, help="no compile starts after this")
    p.add_argument("--candidates", default=",".join(n for n, _ in CANDIDATES),
                   help="comma list, in the order they run")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, checks only (no timing)")
    p.add_argument("--torchao-inductor-config", action="store_true",
                   help="let quantize_ set torchao's Inductor config (coordinate-descent tuning: minutes per compile)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    a.token_list = [int(t) for t in (a.tokens or (DRY_TOKENS if a.dry_run else "2048,8192")).split(",")]
    if any(t < 1 for t in a.token_list):
        p.error(f"--tokens must be positive integers, got {a.tokens!r}")
    a.gran_list = [g for g in a.granularity.split(",") if g]
    names = dict(CANDIDATES)
    a.candidate_list = [(n, names[n]) for n in a.candidates.split(",") if n in names]
    if not a.candidate_list or len(a.candidate_list) != len(a.candidates.split(",")):
        p.error(f"--candidates: expected a comma list of {', '.join(names)}, got {a.candidates!r}")
    if not a.gran_list or any(g not in GRANULARITIES for g in a.gran_list):
        p.error(f"--granularity: expected a comma list of {', '.join(GRANULARITIES)}, got {a.granularity!r}")
    if a.layers < 1:
        p.error(f"--layers must be >= 1, got {a.layers}")
    a.vocab = a.vocab or (128 if a.dry_run else 32768)
    a.device, a.timing = ("cpu", False) if a.dry_run else ("cuda", True)
    if not a.dry_run and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        print("torchao_prefill: needs a CUDA GPU with FP8 (compute capability 8.9+); use --dry-run "
              "on the CPU", file=sys.stderr)
        return 2
    import torchao
    import transformers

    S.raise_recompile_limits()
    S.ensure_backend()
    t0 = time.time()
    rows = run(a)
    meta = dict(env=S.env_info(a.dry_run), torchao=torchao.__version__, transformers=transformers.__version__,
                shape="tiny, dry run" if a.dry_run else "Llama-3-8B shapes", layers=a.layers, vocab=a.vocab,
                tokens=a.token_list, max_rel_err=E.MAX_REL_ERR,
                torchao_inductor_config=a.torchao_inductor_config,
                coordinate_descent_tuning=torch._inductor.config.coordinate_descent_tuning,
                wall_s=round(time.time() - t0, 1),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(meta, rows))
    for r in rows:
        for n, _ in CANDIDATES:
            r[n].pop("_profile", None)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    ran = [r for r in rows if "skipped" not in r["compile_norm"]]
    bad = [f"{r['granularity']} T={r['tokens']}" for r in ran
           if not r.get("fusion_ok") or r.get("numerics_ok") is False
           or any("error" in r[n] or (not a.dry_run and "not_run" in r[n]) for n, _ in CANDIDATES)]
    skipped = [r["compile_norm"]["skipped"] for r in rows if "skipped" in r["compile_norm"]]
    print(f"wrote {out}/results.json and results.md in {meta['wall_s']}s"
          + (f"; NOT fused / correct: {bad}" if bad else "; all fused and correct")
          + (f"; compile_norm skipped in {len(skipped)} rows ({skipped[0]})" if skipped else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
