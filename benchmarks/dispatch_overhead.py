"""Per-call cost of eager dispatch on CPU, on tiny tensors (microseconds per call).

For each op: ``registry.dispatch(op, *args)`` (the chosen provider's ``supports`` checks plus
its call) against calling the chosen provider's ``fn`` directly, and, separately, the full
``torch.ops.compile_norm.<op>(...)`` call (custom-op dispatcher + argument checks + dispatch).
``dispatch - direct`` is the registry's overhead; ``public`` is the op's public callable
(``compile_norm.ops.<op>``: argument check, then the provider without the dispatcher). On a CPU-only machine the chosen provider
is ``native``; the triton providers' ``supports`` functions are timed alone as well, since they
run (and reject) on every call.

    python benchmarks/dispatch_overhead.py [--n 20000]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import compile_norm  # noqa: E402,F401
from compile_norm.kernels import checking  # noqa: E402
from compile_norm.ops import registry  # noqa: E402


def per_call_us(fn, n: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    best = float("inf")
    for _ in range(3):  # best of 3 against noise on a shared machine
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--ops", default="rms_norm,fused_add_rms_norm,rms_norm_fp8_dynamic,"
                   "fused_add_rms_norm_fp8_group,quant_int8_dynamic")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}; {a.n} calls, best of 3; tiny CPU tensors (4 x 128 bf16)")
    print(f"{'op':<32} {'provider':<8} {'direct':>8} {'dispatch':>9} {'overhead':>9} "
          f"{'public':>8} {'torch.ops':>10} {'triton.supports':>16}")
    for op in a.ops.split(","):
        case = checking.Case(op, (4, 128), torch.bfloat16)
        args, kwargs = checking.build_call(case, "cpu")
        pos = checking.positional(op, args, kwargs)
        name = registry.which_provider(op, *pos)
        fn = registry.providers(op)[name].fn
        direct = per_call_us(lambda: fn(*pos), a.n)
        disp = per_call_us(lambda: registry.dispatch(op, *pos), a.n)
        full_op = getattr(torch.ops.compile_norm, op)
        full = per_call_us(lambda: full_op(*args, **kwargs), a.n)
        public_op = getattr(compile_norm.ops, op)
        public = per_call_us(lambda: public_op(*args, **kwargs), a.n)
        tp = registry.providers(op).get("triton")
        sup = per_call_us(lambda: tp.supports(*pos), a.n * 4) if tp else float("nan")
        print(f"{op:<32} {name:<8} {direct:8.2f} {disp:9.2f} {disp - direct:9.2f} "
              f"{public:8.2f} {full:10.2f} {sup:16.3f}")


if __name__ == "__main__":
    main()
