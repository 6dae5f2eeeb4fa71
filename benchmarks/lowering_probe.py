"""Why is a compiled kernel lowering slower or faster than the eager kernel? (GPU)

For each quantizing family, compiles the op call with ``lowering="kernel"`` and
``"generated"``, writes Inductor's output code, lists the kernels it launches and any copies
or clones around them, and times (CUDA-graph replay, median, L2 flushed) the compiled
graphs, the eager op (Triton provider) and the ``compile_norm_kernels`` triton_op called
directly, next to a copy of the same element count.

    python benchmarks/lowering_probe.py --out $OUT [--shapes 8192x4096]
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import re
import sys

import torch
from torch._inductor.utils import run_and_get_code

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402

import compile_norm  # noqa: E402,F401
from compile_norm.kernels import library_ops  # noqa: E402

FAMILY_OP = {"rms_fp8_static": "rms_norm_fp8_static", "rms_fp8_group128": "rms_norm_fp8_group",
             "rms_int8_dynamic": "rms_norm_int8_dynamic",
             "add_rms_fp8_dynamic": "fused_add_rms_norm_fp8_dynamic"}
LAUNCH_RE = re.compile(r"^\s*(\w+)\.run\(", re.M)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x4096,8192x5376")
    p.add_argument("--families", default=",".join(FAMILY_OP))
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.DEBUG)
    kops = library_ops.register()
    for shape in a.shapes.split(","):
        t, h = map(int, shape.split("x"))
        src = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_us = G.graph_time_us(lambda: dst.copy_(src))
        print(f"== {shape} copy {copy_us:.1f} us", flush=True)
        for fam in a.families.split(","):
            spec = G.families(t, h)[fam]
            name, args = spec["ref_op"]
            times = {"eager op": G.graph_time_us(spec["op"])}
            kop = kops[FAMILY_OP[fam]]
            kargs = _op_args(FAMILY_OP[fam], args)
            times["triton_op direct"] = G.graph_time_us(lambda: kop(*kargs))
            op = getattr(torch.ops.compile_norm, FAMILY_OP[fam])

            def f(*xs):
                return op(*xs)

            for lowering in ("kernel", "generated"):
                torch._dynamo.reset()
                c = torch.compile(f, backend="compile_norm", dynamic=False,
                                  options={"lowering": lowering, "passes": [], "strict": True})
                _, codes = run_and_get_code(c, *kargs)
                code = "\n".join(codes)
                (out / f"code_{shape}_{fam}_{lowering}.py").write_text(code)
                launches = LAUNCH_RE.findall(code)
                extra = [ln.strip() for ln in code.splitlines()
                         if re.search(r"\b(clone|copy_|empty_strided_cuda|extern_kernels)\b", ln)]
                times[f"compiled {lowering}"] = G.graph_time_us(lambda: c(*kargs))
                print(f"   {fam} {lowering}: launches {launches}", flush=True)
                for ln in extra[:12]:
                    print(f"      {ln[:160]}", flush=True)
            for k, us in times.items():
                print(f"   {fam:<20} {k:<18} {us:7.1f} us  ratio {spec['bytes'] / us / 1e3 / (4 * t * h / copy_us / 1e3):.2f}",
                      flush=True)
    return 0


def _op_args(op_name: str, args: tuple) -> list:
    """Positional schema arguments of the family's op call (defaults filled in)."""
    from compile_norm.kernels import checking

    return list(checking.positional(op_name, args, {}))


if __name__ == "__main__":
    raise SystemExit(main())
