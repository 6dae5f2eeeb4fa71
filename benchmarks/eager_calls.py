"""Wall time per back-to-back eager call of every op, against ATen in the same run (GPU).

BENCHMARKS.md's eager figure: no CUDA graph, launch and Python included, 1 x 4096 bf16 by
default. Rows:
- baselines: ``x.mul(1)``, ``torch.empty_like``, ``F.rms_norm`` (with and without grad),
  Liger's ``LigerRMSNormFunction`` where installed;
- every forward op through its public callable (``compile_norm.ops.<op>``: the provider
  called directly) and through the torch op (``torch.ops.compile_norm.<op>``: dispatcher,
  then the same provider);
- training: rms_norm / fused add with inputs that need grad (forward alone, and forward +
  backward against F.rms_norm's forward + backward);
- where the time goes: argument check, ``prepare`` (outputs + launch arguments), the
  specialization key, and the launch routes of ``norm_quant_kernel`` (public
  ``JITFunction[grid]``, and the warmed ``CompiledKernel[grid]`` the provider uses).
Writes ``eager_calls.json`` under ``--out``; prints a table with each row's ratio to F.rms_norm.

    python benchmarks/eager_calls.py [--out DIR] [--hidden 4096] [--tokens 1]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def per_call_us(fn, n: int = 2000) -> float:
    """Best of 5 loops of ``n`` back-to-back calls, synchronized at the ends."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1)
    a = p.parse_args(argv)

    import compile_norm
    from compile_norm.kernels import checking, triton_ops as T
    from compile_norm.ops import registry

    dev, bf16, h = "cuda", torch.bfloat16, a.hidden
    x = torch.randn(a.tokens, h, device=dev, dtype=bf16)
    w = torch.randn(h, device=dev, dtype=bf16)
    rows: dict[str, float] = {}

    def row(name, fn):
        try:
            rows[name] = per_call_us(fn)
        except Exception as e:  # keep measuring the other rows
            rows[name] = float("nan")
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
        print(f"{name:<60} {rows[name]:8.2f} us", flush=True)

    row("aten x.mul(1)", lambda: x.mul(1))
    row("aten torch.empty_like(x)", lambda: torch.empty_like(x))
    row("aten F.rms_norm", lambda: F.rms_norm(x, (h,), w, 1e-6))
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        row("liger rms_norm", lambda: LigerRMSNormFunction.apply(x, w, 1e-6))
    except ImportError:
        pass

    for op in checking.all_ops():
        args, kwargs = checking.build_call(checking.Case(op, (a.tokens, h), bf16), dev)
        public, torch_op = getattr(compile_norm.ops, op), getattr(torch.ops.compile_norm, op)
        row(f"{op} (compile_norm.ops)", lambda f=public, a_=args, k=kwargs: f(*a_, **k))
        row(f"{op} (torch.ops)", lambda f=torch_op, a_=args, k=kwargs: f(*a_, **k))

    # training: inputs that need grad record the autograd graph
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    r = torch.randn_like(x)
    gy = torch.randn_like(x)
    row("aten F.rms_norm (grad)", lambda: F.rms_norm(xg, (h,), wg, 1e-6))
    row("rms_norm (grad, compile_norm.ops)", lambda: compile_norm.rms_norm(xg, wg, 1e-6))
    row("fused_add_rms_norm (grad, compile_norm.ops)",
        lambda: compile_norm.fused_add_rms_norm(xg, r, wg, 1e-6))
    row("aten F.rms_norm fwd+bwd",
        lambda: torch.autograd.grad(F.rms_norm(xg, (h,), wg, 1e-6), (xg, wg), gy))
    row("rms_norm fwd+bwd (compile_norm.ops)",
        lambda: torch.autograd.grad(compile_norm.rms_norm(xg, wg, 1e-6), (xg, wg), gy))

    # where an rms_norm call's time goes
    spec = registry.spec("rms_norm")
    full = (x, w, 1e-6, 0.0, None)
    row("layer: Op argument binding + check", lambda: (spec.bind((x, w, 1e-6), {}), spec.check(*full)))
    row("layer: triton provider supports()", lambda: T.accepts(spec, full))
    row("layer: prepare (outputs + launch arguments)", lambda: T.prepare(spec, full))
    launch = T.prepare(spec, full)
    row("layer: specialization key", lambda: T.specialization_key(launch.args))
    kw = launch.const_kwargs()
    row("layer: norm_quant_kernel JITFunction[grid] (public)",
        lambda: T.K.norm_quant_kernel[(launch.grid0,)](*launch.args, **kw, num_warps=launch.num_warps))
    compiled = T.K.norm_quant_kernel.warmup(*launch.args, **kw, num_warps=launch.num_warps,
                                            grid=(launch.grid0,))
    row("layer: norm_quant_kernel CompiledKernel[grid] (warmed)",
        lambda: compiled[(launch.grid0, 1, 1)](*launch.args, *launch.consts))

    base = rows["aten F.rms_norm"]
    print(f"\n{'ratio to F.rms_norm (same run)':<60}")
    for name, us in rows.items():
        if not name.startswith("layer"):
            ref = rows["aten F.rms_norm (grad)"] if "grad" in name and "fwd+bwd" not in name else (
                rows["aten F.rms_norm fwd+bwd"] if "fwd+bwd" in name else base)
            print(f"  {name:<58} {us / ref:5.2f}x")
    if a.out:
        pathlib.Path(a.out, "eager_calls.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                 triton=__import__("triton").__version__, tokens=a.tokens, hidden=h,
                 us=rows), indent=1))


if __name__ == "__main__":
    main()
