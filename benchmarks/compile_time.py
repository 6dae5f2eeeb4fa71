"""Compile time of a Llama-shaped stack of decoder blocks: compile_norm backend vs stock Inductor.

Issue target: the backend compiles a 32-block stack in at most 1.10x the time stock
``torch.compile`` takes on the same model. Each measurement is a cold compile (Dynamo reset,
Inductor caches disabled) of the whole stack plus its first call; the two backends alternate
and the median of ``--repeats`` is reported. Writes compile_time.json into --out if given.

    python benchmarks/compile_time.py [--layers 32] [--hidden 256] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import compile_norm  # noqa: E402,F401
from llama_block import LlamaBlocks, LlamaRMSNorm  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


def build(layers: int, hidden: int, device: str):
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    model = LlamaBlocks(layers, hidden, heads, max(1, heads // 2), hidden * 3, max_pos=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LlamaRMSNorm):
                m.weight.normal_(1.0, 0.1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    return model, torch.randn(1, 32, hidden, device=device, dtype=dtype)


def cold_compile_seconds(model, x, backend: str) -> float:
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        start = time.perf_counter()
        torch.compile(model, backend=backend, dynamic=False)(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    model, x = build(args.layers, args.hidden, args.device)
    times: dict[str, list[float]] = {"inductor": [], "compile_norm": []}
    warm_model, warm_x = build(1, args.hidden, args.device)
    cold_compile_seconds(warm_model, warm_x, "inductor")  # imports and toolchain, once
    for _ in range(args.repeats):
        for backend in times:
            counters.clear()
            times[backend].append(cold_compile_seconds(model, x, backend))
            if backend == "compile_norm":
                fused = dict(counters["compile_norm"])
    med = {b: statistics.median(t) for b, t in times.items()}
    ratio = med["compile_norm"] / med["inductor"]
    result = {
        "layers": args.layers, "hidden": args.hidden, "device": args.device,
        "torch": torch.__version__, "cpus": os.cpu_count(), "seconds": times,
        "median_seconds": med, "ratio": ratio,
        "counters": {k: v for k, v in fused.items() if k.endswith("_matched")},
    }
    print(f"{args.layers} blocks, hidden {args.hidden}, {args.device}, torch {torch.__version__}")
    for b, t in times.items():
        print(f"  {b:13s} median {med[b]:6.2f} s  ({', '.join(f'{v:.2f}' for v in t)})")
    print(f"  ratio compile_norm / stock: {ratio:.3f}   fused: {result['counters']}")
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out, "compile_time.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
