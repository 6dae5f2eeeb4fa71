"""Shared by the examples: command line, device/dtype choice, and printing what fused and how fast.

Every example takes ``--tiny`` (small sizes: the tests use it), ``--device``, ``--out DIR`` (the
HTML report and stage graphs) and a hidden ``--backend`` (tests point it at a stand-in).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# the examples run from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compile_norm.inspect import inspect_model  # noqa: E402


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="small sizes, for a quick check")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", metavar="DIR", help="write report.html and the stage graphs here")
    p.add_argument("--backend", default="compile_norm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def default_dtype(device: str) -> torch.dtype:
    # bfloat16 is what these models run in on a GPU; float32 keeps CPU compiles quick
    return torch.bfloat16 if device == "cuda" else torch.float32


def _backend(spec: str):
    if ":" in spec:  # "path/to/file.py:function", for tests
        from compile_norm.inspect.targets import load_object

        return load_object(spec, "--backend")
    if spec not in torch._dynamo.list_backends(exclude_tags=()):
        sys.exit(f"the {spec!r} torch.compile backend is not registered: install compile_norm "
                 "(pip install -e .) so its torch_dynamo_backends entry point is found")
    try:
        torch._dynamo.lookup_backend(spec)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"the {spec!r} torch.compile backend cannot be loaded: {type(e).__name__}: {e}")
    return spec


def inspect_and_print(model, inputs, args, title: str, tolerances=None):
    """Compile with the backend, print what fused and the time against stock torch.compile."""
    torch.manual_seed(0)
    report = inspect_model(
        model, inputs, backend=_backend(args.backend), bench=True, out_dir=args.out,
        repeats=5 if args.tiny else 20, title=title, tolerances=tolerances,
    )
    print(f"== {title} on {report.device}")
    counts = report.fused_counts()
    print(f"fused sites: {report.fused_summary()}")
    for op, n in sorted(counts.items()):
        sources = sorted({s.source for s in report.fused if s.op == op and s.source})
        print(f"  {op} x{n}")
        for src in sources[:6]:
            print(f"      at {src}")
    print(f"left unfused: {len(report.unmatched)}")
    for u in report.unmatched[:10]:
        print(f"  [{u.stage}] {u.site}: {u.reason}")
    print(f"generated kernels: {len(report.kernels)}")
    for c in report.numerics:
        print(f"numerics {c.name}: max abs diff {c.max_abs:.3g} vs eager "
              f"({'pass' if c.ok else 'FAIL'} at atol {c.atol:g}, rtol {c.rtol:g})")
    b = report.bench
    print(f"time per call: {report.backend} {b.describe('backend', b.backend_us)}, stock "
          f"torch.compile {b.describe('stock', b.stock_us)}, eager {b.describe('eager', b.eager_us)} "
          f"({b.speedup:.2f}x vs stock; wall clock, candidates interleaved, median "
          f"[25th-75th percentile] of {b.repeats})")
    print(f"  {b.expectation}")
    for w in report.warnings:
        print(f"warning: {w}")
    if args.out:
        print(f"report: {os.path.join(args.out, 'report.html')}")
    return report
