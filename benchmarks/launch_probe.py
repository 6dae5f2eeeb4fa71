"""Where an eager call's time goes: wall time per back-to-back call of each layer (GPU).

Layers from the bottom: ATen baselines (``x.mul(1)``, ``torch.empty_like``, ``F.rms_norm``),
Triton launch routes (``JITFunction[grid]``, ``wrap_triton``, a warmed ``CompiledKernel[grid]``),
torch's public custom-op routes (``torch.library.custom_op`` and ``Library.define`` + ``impl``,
with and without ``register_autograd``), ``autograd.Function.apply``, and compile_norm's own
entry points. Prints one line per layer (microseconds per call, 1 x 4096 bf16).

    python benchmarks/launch_probe.py [--out DIR]
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


def per_call_us(fn, n: int = 3000) -> float:
    for _ in range(200):
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
    a = p.parse_args(argv)
    import triton
    import triton.language as tl

    dev = "cuda"
    x = torch.randn(1, a.hidden, device=dev, dtype=torch.bfloat16)
    w = torch.randn(a.hidden, device=dev, dtype=torch.bfloat16)
    rows: dict[str, float] = {}

    def row(name, fn):
        try:
            rows[name] = per_call_us(fn)
        except Exception as e:  # keep probing the other layers
            rows[name] = float("nan")
            print(f"{name}: failed: {type(e).__name__}: {e}")
        print(f"{name:<58} {rows[name]:8.2f} us", flush=True)

    row("aten x.mul(1)", lambda: x.mul(1))
    row("aten torch.empty_like(x)", lambda: torch.empty_like(x))
    row("aten F.rms_norm", lambda: F.rms_norm(x, (a.hidden,), w, 1e-6))
    row("python torch.compiler.is_compiling()", lambda: torch.compiler.is_compiling())
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    row("python is_in_torch_dispatch_mode()", lambda: is_in_torch_dispatch_mode())
    row("python torch.is_grad_enabled()", lambda: torch.is_grad_enabled())

    @triton.jit
    def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    y = torch.empty_like(x)
    row("triton small kernel JITFunction[grid] (4 args)",
        lambda: copy_kernel[(1,)](x, y, x.numel(), BLOCK=4096))
    compiled = copy_kernel.warmup(x, y, x.numel(), BLOCK=4096, grid=(1,))
    runner = compiled[(1, 1, 1)]
    row("triton small kernel CompiledKernel[grid] (warmup)", lambda: runner(x, y, x.numel()))
    from torch.library import wrap_triton
    wrapped = wrap_triton(copy_kernel)
    row("triton small kernel wrap_triton(...)[grid]", lambda: wrapped[(1,)](x, y, x.numel(), BLOCK=4096))

    import compile_norm
    from compile_norm.kernels import triton_ops as T
    from compile_norm.ops import registry

    cn = torch.ops.compile_norm
    row("compile_norm torch.ops.compile_norm.rms_norm", lambda: cn.rms_norm(x, w, 1e-6))
    row("compile_norm compile_norm.rms_norm", lambda: compile_norm.rms_norm(x, w, 1e-6))
    row("compile_norm registry.dispatch", lambda: registry.dispatch("rms_norm", x, w, 1e-6, 0.0, None))
    row("compile_norm triton provider fn", lambda: T.rms_norm(x, w, 1e-6, 0.0, None))
    out, _, _, launch = T.prepare_launch(x, None, w, 1e-6, 0.0, None, True, True, T._NO_QUANT)
    grid0, args, consts, nw = launch
    row("compile_norm prepare_launch (no launch)",
        lambda: T.prepare_launch(x, None, w, 1e-6, 0.0, None, True, True, T._NO_QUANT))
    kw = dict(zip(T._ARG_NAMES[len(args):], consts))
    row("norm_quant_kernel JITFunction[grid] (public)",
        lambda: T.K.norm_quant_kernel[(grid0,)](*args, **kw, num_warps=nw))
    row("norm_quant_kernel cached CompiledKernel.run (private)",
        lambda: T._kernel_launch(grid0, 0, args, consts, nw))
    ck = T.K.norm_quant_kernel.warmup(*args, **kw, num_warps=nw, grid=(grid0,))
    ck_runner = ck[(grid0, 1, 1)]
    row("norm_quant_kernel CompiledKernel[grid] (tutorial API)", lambda: ck_runner(*args, *consts))
    wq = wrap_triton(T.K.norm_quant_kernel)
    row("norm_quant_kernel wrap_triton(...)[grid]", lambda: wq[(grid0,)](*args, **kw, num_warps=nw))
    row("norm_quant_kernel JITFunction[grid] (positional consts)",
        lambda: T.K.norm_quant_kernel[(grid0,)](*args, *consts, num_warps=nw))

    # torch's public custom-op routes, each around the same trivial body
    def body(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t)

    co = torch.library.custom_op("probe::co", body, mutates_args=())
    row("torch.library.custom_op (no autograd)", lambda: co(x))
    co2 = torch.library.custom_op("probe::co2", body, mutates_args=())
    co2.register_autograd(lambda ctx, g: g)
    row("torch.library.custom_op + register_autograd", lambda: co2(x))
    lib = torch.library.Library("probe", "FRAGMENT")
    lib.define("ld(Tensor t) -> Tensor")
    lib.impl("ld", body, "CUDA")
    ld = torch.ops.probe.ld.default
    row("Library.define + impl(CUDA)", lambda: ld(x))
    lib.define("ld2(Tensor t) -> Tensor")
    lib.impl("ld2", body, "CUDA")
    torch.library.register_autograd("probe::ld2", lambda ctx, g: g, lib=lib)
    ld2 = torch.ops.probe.ld2.default
    row("Library.define + impl(CUDA) + register_autograd", lambda: ld2(x))
    lib.define("ld3(Tensor t) -> Tensor")
    lib.impl("ld3", body, "CompositeExplicitAutograd")
    ld3 = torch.ops.probe.ld3.default
    row("Library.define + impl(CompositeExplicitAutograd)", lambda: ld3(x))

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.empty_like(t)

        @staticmethod
        def backward(ctx, g):
            return g

    row("autograd.Function.apply (no grad needed)", lambda: Fn.apply(x))
    xg = x.clone().requires_grad_()
    row("autograd.Function.apply (grad needed)", lambda: Fn.apply(xg))
    row("torch.ops.compile_norm.rms_norm (grad needed)", lambda: cn.rms_norm(xg, w, 1e-6))

    if a.out:
        pathlib.Path(a.out, "launch_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
