"""The rms_norm backward: the ``rms_norm_backward`` op, its Triton kernel, and the autograd
formulas of rms_norm / fused_add_rms_norm that dispatch to it in eager (fused add passes the
gradient of residual_out as ``grad_residual``: added to dx in the kernel, bit for bit as
torch adds it).

The kernel runs on CPU through the Triton interpreter in one child process (this file run as
a script; TRITON_INTERPRET must be set before triton is imported), as in
test_kernels_interpret.py; the tests here read its report. CUDA tests run it compiled.

Tolerances (``check_backward``), against the reference evaluated in float64 (the fp32
reference itself is held to the same bounds, so they are not tailored to the kernel):
- dx (x.dtype): ``finfo(x.dtype).eps * |dx|`` (the final rounding: <= 1 ulp) plus
  ``(8 + 2 sqrt(H)) * eps_fp32 * (|g w rstd| + |x| * sum|g w x| rstd^3 / V)``: fp32 rounding
  of the two terms whose difference dx is (they may cancel) and of the row sums (rstd, the
  dot product: random-walk growth sqrt(H)).
- dweight (weight dtype): ``finfo(w.dtype).eps * |dw|`` plus
  ``(8 + 2 sqrt(T) + 2 sqrt(H)) * eps_fp32 * sum_rows |g x rstd|``: an fp32 sum over T rows
  taken in another order than torch's, of terms carrying rstd's error.
"""

from __future__ import annotations

import json
import math

import pytest

from helpers import interpreter_report
import torch

EPS = 1e-6
EPS32 = torch.finfo(torch.float32).eps


def backward_problems(grad, x, weight, eps, offset, vsize, dx, dweight) -> list[str]:
    """What is wrong with ``(dx, dweight)`` as the backward of rms_norm (empty: nothing)."""
    from compile_norm.ops.norm import rms_norm_backward_ref

    problems = []
    hidden = x.shape[-1]
    n_var = hidden if vsize is None else vsize
    if dx.shape != x.shape or dx.dtype != x.dtype:
        problems.append(f"dx {tuple(dx.shape)} {dx.dtype}, expected {tuple(x.shape)} {x.dtype}")
    if (weight is None) != (dweight is None):
        problems.append(f"dweight is {None if dweight is None else 'a tensor'} for weight {weight is not None}")
    if weight is not None and dweight is not None and (
        dweight.shape != weight.shape or dweight.dtype != weight.dtype
    ):
        problems.append(f"dweight {tuple(dweight.shape)} {dweight.dtype}, expected {weight.dtype}")
    if problems:
        return problems
    g64, x64 = grad.double(), x.double()
    w64 = None if weight is None else weight.double()
    want_dx, want_dw = rms_norm_backward_ref(g64, x64, w64, eps, offset, vsize)
    rstd = torch.rsqrt(x64[..., :n_var].pow(2).mean(-1, keepdim=True) + eps)
    gw = g64 if w64 is None else g64 * (w64 + offset)
    coef_abs = (gw * x64).abs().sum(-1, keepdim=True) * rstd.pow(3) / n_var
    xv = torch.nn.functional.pad(x64[..., :n_var], (0, hidden - n_var))
    terms = (gw * rstd).abs() + xv.abs() * coef_abs
    bound = torch.finfo(x.dtype).eps * want_dx.abs() + (8 + 2 * math.sqrt(hidden)) * EPS32 * terms
    err = (dx.double() - want_dx).abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        problems.append(f"dx: {int((err > bound).sum())} of {err.numel()} outside the bound; worst "
                        f"{dx.double().flatten()[i].item()} vs {want_dx.flatten()[i].item()} "
                        f"(bound {bound.flatten()[i].item():.3g})")
    if weight is not None:
        tokens = x.numel() // hidden
        s = (g64 * x64 * rstd).abs().reshape(-1, hidden).sum(0)
        bound = (torch.finfo(weight.dtype).eps * want_dw.abs()
                 + (8 + 2 * math.sqrt(tokens) + 2 * math.sqrt(hidden)) * EPS32 * s)
        err = (dweight.double() - want_dw).abs()
        if not bool((err <= bound).all()):
            i = int((err - bound).argmax())
            problems.append(f"dweight: {int((err > bound).sum())} of {err.numel()} outside the "
                            f"bound; worst {dweight[i].item()} vs {want_dw[i].item()} "
                            f"(bound {bound[i].item():.3g})")
    return problems


def make_case(tokens, hidden, dtype, weight="same", offset=0.0, vsize=None, layout="2d", seed=0):
    """(grad, x, weight, eps, offset, vsize) on CPU; layout "3d_nc": 3-D, non-contiguous."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    if layout == "3d_nc":  # [2, tokens, hidden] viewed from a [tokens, 2, hidden] buffer
        x = rand(tokens, 2, hidden).to(dtype).transpose(0, 1)
        grad = rand(2 * hidden, tokens).to(dtype).t().reshape(tokens, 2, hidden).transpose(0, 1)
    else:
        x, grad = rand(tokens, hidden).to(dtype), rand(tokens, hidden).to(dtype)
    w = None
    if weight == "same":
        w = (1.0 + 0.3 * rand(hidden)).to(dtype)
    elif weight == "fp32":
        w = 0.3 * rand(hidden)
    return grad, x, w, EPS, offset, vsize


def interpreter_cases() -> list[tuple[str, tuple]]:
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for hidden in (64, 384, 1000):
            for tokens in (0, 1, 37):
                cases.append((f"{dtype}_{tokens}x{hidden}", make_case(tokens, hidden, dtype)))
        d = str(dtype)
        cases += [
            (f"{d}_no_weight", make_case(37, 384, dtype, weight=None)),
            (f"{d}_gemma_offset", make_case(37, 1000, dtype, weight="fp32", offset=1.0)),
            (f"{d}_offset_same_dtype", make_case(5, 64, dtype, offset=1.0)),
            (f"{d}_variance_size", make_case(37, 1000, dtype, vsize=600)),
            (f"{d}_variance_size_no_weight", make_case(9, 384, dtype, weight=None, vsize=100)),
            (f"{d}_3d_noncontiguous", make_case(19, 384, dtype, layout="3d_nc")),
            (f"{d}_3d_noncontiguous_zero", make_case(0, 64, dtype, layout="3d_nc")),
        ]
    cases.append(("fp16_weight_fp32", make_case(37, 1000, torch.float16, weight="fp32")))
    cases.append(("eps_zero", make_case(37, 384, torch.bfloat16)[:3] + (0.0, 0.0, None)))
    return cases


# --- the interpreter child ----------------------------------------------------------------


def _child() -> None:
    import compile_norm  # noqa: F401
    from compile_norm.kernels import triton_backward
    from compile_norm.ops import registry

    assert triton_backward.SUPPORTED, triton_backward.REASON
    launches = [0]
    real = triton_backward.K

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches[0] += 1
                return launch(*args, **kwargs)

            return run

    triton_backward.K = type("K", (), {
        "rms_norm_backward_kernel": Counting(real.rms_norm_backward_kernel),
        "dweight_reduce_kernel": Counting(real.dweight_reduce_kernel),
    })
    cn = torch.ops.compile_norm

    def launches_of(x, w) -> int:
        # dx (and the dweight partials), then their column sums unless one program did it all
        if x.numel() == 0:
            return 0
        cfg = triton_backward.launch_config(x.shape[-1])
        blocks = -(-x.numel() // x.shape[-1] // cfg.block_m)
        return 1 if w is None or triton_backward.programs(blocks, cfg, x) == 1 else 2

    results = []

    def record(name, fn, expected_launches):
        before = launches[0]
        try:
            problems = fn()
        except Exception as e:  # report, don't stop the run
            problems = [f"{type(e).__name__}: {e}"]
        if launches[0] - before != expected_launches:
            problems.append(f"{launches[0] - before} kernel launches, expected {expected_launches}")
        results.append({"name": name, "problems": problems})

    for name, case in interpreter_cases():
        grad, x, w = case[:3]

        def op_call(case=case):
            assert registry.which_provider("rms_norm_backward", *case) == "triton"
            dx, dw = cn.rms_norm_backward(*case)
            return backward_problems(*case, dx, dw)

        record(f"op_{name}", op_call, launches_of(x, w))

    # autograd through the forward ops: their backward runs the kernel
    def rms_autograd(tokens, hidden, dtype, **kw):
        grad, x, w, eps, offset, vsize = make_case(tokens, hidden, dtype, **kw)
        xr = x.detach().requires_grad_()
        wr = None if w is None else w.detach().requires_grad_()
        cn.rms_norm(xr, wr, eps, offset, vsize).backward(grad)
        return backward_problems(grad, x, w, eps, offset, vsize, xr.grad,
                                 None if wr is None else wr.grad)

    def add_autograd(tokens, hidden, dtype, **kw):
        grad, x, w, eps, offset, vsize = make_case(tokens, hidden, dtype, **kw)
        r = torch.randn(x.shape).to(dtype)
        g_res = torch.randn(x.shape).to(dtype)
        xr, rr = x.detach().requires_grad_(), r.detach().requires_grad_()
        wr = w.detach().requires_grad_()
        y, h = cn.fused_add_rms_norm(xr, rr, wr, eps, offset, vsize)
        torch.autograd.backward((y, h), (grad, g_res))
        problems = []
        if not torch.equal(xr.grad, rr.grad):
            problems.append("grad of x and of residual differ")
        # the kernel's dh, plus grad_residual_out in x.dtype: as the formula adds them
        dh, dw = cn.rms_norm_backward(grad, (x + r).contiguous(), w, eps, offset, vsize)
        if not torch.equal(xr.grad, dh + g_res):
            problems.append("grad of x is not rms_norm_backward's dx + grad of residual_out")
        return problems + backward_problems(grad, (x + r), w, eps, offset, vsize, dh, wr.grad)

    # fused add's grad_residual: added in the kernel exactly as torch adds it afterwards
    def with_grad_residual(tokens, hidden, dtype, **kw):
        case = make_case(tokens, hidden, dtype, **kw)
        gr = torch.randn(case[1].shape).to(dtype)
        if kw.get("layout") == "3d_nc":
            gr = gr.transpose(0, 1).contiguous().transpose(0, 1)
        assert registry.which_provider("rms_norm_backward", *case, gr) == "triton"
        dx, dw = cn.rms_norm_backward(*case)
        dx_r, dw_r = cn.rms_norm_backward(*case, grad_residual=gr)
        problems = [] if torch.equal(dx_r, dx + gr) else ["dx(grad_residual) != dx + grad_residual"]
        if dw is not None and not torch.equal(dw_r, dw):
            problems.append("dweight depends on grad_residual")
        return problems + backward_problems(*case, dx, dw)

    # one program stores dweight itself: the bits the partial and its column sum would give
    def direct_dweight_bits(tokens, hidden, dtype, **kw):
        case = make_case(tokens, hidden, dtype, **kw)
        seen = []
        kernel = triton_backward.K.rms_norm_backward_kernel
        triton_backward.K.rms_norm_backward_kernel = type("Seeing", (), {
            "__getitem__": lambda self, grid: (lambda *a, **k: seen.append((grid, a, k))
                                               or kernel[grid](*a, **k))})()
        try:
            dx, dw = cn.rms_norm_backward(*case)
        finally:
            triton_backward.K.rms_norm_backward_kernel = kernel
        (grid, args, kwargs), = seen
        if grid != (1,) or not kwargs["DW_DIRECT"]:
            return [f"grid {grid}, DW_DIRECT {kwargs['DW_DIRECT']}: not the one-program launch"]
        partial = torch.empty((1, hidden), dtype=torch.float32)
        dx2 = torch.empty_like(dx)
        args = list(args)
        args[4], args[5] = dx2, partial
        real.rms_norm_backward_kernel[grid](*args, **{**kwargs, "DW_DIRECT": False})
        dw2 = torch.empty_like(dw)
        block_c = triton_backward.REDUCE_CONFIG.block_c
        real.dweight_reduce_kernel[(-(-hidden // block_c),)](partial, dw2, 1, hidden, BLOCK_P=1,
                                                             BLOCK_C=block_c, PRECISE=False,
                                                             num_warps=4)
        problems = [] if torch.equal(dx, dx2) else ["dx differs"]
        bits = {2: torch.int16, 4: torch.int32}[dw.element_size()]
        if not torch.equal(dw.view(bits), dw2.view(bits)):
            problems.append("dweight's bits differ from the partial's column sum")
        return problems + backward_problems(*case, dx, dw)

    record("direct_dweight_bits_1x1000", lambda: direct_dweight_bits(1, 1000, torch.bfloat16), 1)
    record("direct_dweight_bits_37x64_gemma", lambda: direct_dweight_bits(
        37, 64, torch.bfloat16, weight="fp32", offset=1.0), 1)

    record("grad_residual_bf16", lambda: with_grad_residual(37, 1000, torch.bfloat16), 4)
    record("grad_residual_fp32_3d_nc_no_weight", lambda: with_grad_residual(
        19, 384, torch.float32, weight=None, layout="3d_nc"), 2)
    record("grad_residual_zero_tokens", lambda: with_grad_residual(0, 64, torch.bfloat16), 0)

    record("autograd_rms_norm_bf16", lambda: rms_autograd(37, 1000, torch.bfloat16), 2)
    record("autograd_rms_norm_gemma_vsize", lambda: rms_autograd(
        11, 384, torch.float32, weight="fp32", offset=1.0, vsize=200), 2)
    record("autograd_rms_norm_no_weight_3d", lambda: rms_autograd(
        7, 64, torch.bfloat16, weight=None, layout="3d_nc"), 1)
    record("autograd_fused_add_bf16", lambda: add_autograd(37, 384, torch.bfloat16), 4)

    def parameter_weight():  # model weights are nn.Parameter: the kernel still runs
        grad, x, w, eps, offset, vsize = make_case(9, 384, torch.bfloat16)
        norm = torch.nn.Module()
        norm.weight = torch.nn.Parameter(w.clone())
        xr = x.clone().requires_grad_()
        cn.rms_norm(xr, norm.weight, eps).backward(grad)
        return backward_problems(grad, x, w, eps, offset, vsize, xr.grad, norm.weight.grad)

    record("autograd_parameter_weight", parameter_weight, 2)

    # fp64 and double backward take the reference (no launch)
    def fp64_gradcheck():
        x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
        w = torch.randn(24, dtype=torch.float64, requires_grad=True)
        assert registry.which_provider("rms_norm_backward", x, x, w, EPS) == "native"
        f = lambda x, w: cn.rms_norm(x, w, EPS, 0.5, 16)  # noqa: E731
        ok = torch.autograd.gradcheck(f, (x, w)) and torch.autograd.gradgradcheck(f, (x, w))
        return [] if ok else ["gradcheck failed"]

    record("fp64_gradcheck", fp64_gradcheck, 0)

    def double_backward_fp32():
        x = torch.randn(5, 64, requires_grad=True)
        w = torch.randn(64, requires_grad=True)
        (gx,) = torch.autograd.grad(cn.rms_norm(x, w, EPS).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()  # through the reference's ops
        return [] if w.grad is not None and bool(w.grad.isfinite().all()) else ["no double backward"]

    record("double_backward_uses_reference", double_backward_fp32, 0)
    print("REPORT" + json.dumps({"results": results}))


@pytest.fixture(scope="module")
def report():
    report = interpreter_report(__file__, timeout=900)
    return {r["name"]: r["problems"] for r in report["results"]}


def _names():
    return [f"op_{n}" for n, _ in interpreter_cases()] + [
        "grad_residual_bf16", "grad_residual_fp32_3d_nc_no_weight", "grad_residual_zero_tokens",
        "autograd_rms_norm_bf16", "autograd_rms_norm_gemma_vsize",
        "autograd_rms_norm_no_weight_3d", "autograd_fused_add_bf16", "autograd_parameter_weight",
        "fp64_gradcheck", "double_backward_uses_reference",
        "direct_dweight_bits_1x1000", "direct_dweight_bits_37x64_gemma",
    ]


@pytest.mark.parametrize("name", _names())
def test_interpreter(report, name):
    assert name in report, sorted(report)
    assert not report[name], "\n".join(report[name])


# --- CPU (no interpreter): the op, the registry, the tolerance check ------------------------

cn = torch.ops.compile_norm


def test_configs_up_to_8192_columns_take_no_register_cap():
    """A compiled graph launches the backward through wrap_triton, which takes no register
    cap: a capped config would run other code compiled than eager (H200 run 52: the per-head
    kernel 21.8 us compiled against 16.8 eager under a 128-register cap). Per-head rows take
    blocks of 8K elements, 256-1024 columns pipelined blocks of 4K (run 53)."""
    from compile_norm.kernels import triton_backward as B

    for hidden in (1, 16, 64, 100, 128, 200, 256, 768, 1024, 2048, 3000, 4096, 5376, 8192):
        cfg = B.launch_config(hidden)
        assert cfg.maxnreg is None, (hidden, cfg)
        assert cfg.block_h == 1 << (hidden - 1).bit_length()
    assert [B.launch_config(h).block_m * B.launch_config(h).block_h for h in (64, 128, 256, 1024)] == \
        [8192, 8192, 4096, 4096]
    assert B.launch_config(128).num_stages == 1 and B.launch_config(256).num_stages == 3


def test_persistent_grid_narrows_for_few_row_blocks(monkeypatch):
    """The backward's grid (H200 runs 46-47): the config's programs per SM once there are 16+ row
    blocks per SM, one per SM below that for pipelined rows of 4K+ columns, one per row block
    when there are fewer; rows of 8192 padded columns take one per SM throughout."""
    from compile_norm.kernels import triton_backward as B

    monkeypatch.setattr(B.T, "INTERPRET", False)
    monkeypatch.setattr(B, "_sm_count", lambda index: 132)
    x = torch.empty(1, 4096, device="meta")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    c4096, c5376, c2048, c128 = (B.launch_config(h) for h in (4096, 5376, 2048, 128))
    assert (c4096.programs_per_sm, c5376.programs_per_sm, c2048.programs_per_sm) == (2, 1, 2)
    assert [B.programs(t, c4096, x) for t in (1, 32, 256, 2111, 2112, 8192)] == [1, 32, 132, 132, 264, 264]
    assert [B.programs(t, c5376, x) for t in (32, 256, 8192)] == [32, 132, 132]
    assert [B.programs(n, c2048, x) for n in (64, 1024)] == [64, 264]  # not measured narrower
    assert B.programs(2048, c128, x) == 264  # per-head rows keep their config


def test_cpu_dispatches_to_native():
    from compile_norm.ops import registry

    grad, x, w, *rest = make_case(4, 64, torch.bfloat16)
    assert registry.which_provider("rms_norm_backward", grad, x, w, *rest) == "native"
    dx, dw = cn.rms_norm_backward(grad, x, w, *rest)
    ref = registry.ops()["rms_norm_backward"].reference(grad, x, w, *rest)
    assert torch.equal(dx, ref[0]) and torch.equal(dw, ref[1])


@pytest.mark.parametrize("name,case", interpreter_cases()[:12] + interpreter_cases()[-4:])
def test_reference_in_fp32_meets_the_bounds(name, case):
    # the bounds hold for the fp32 reference itself: they are not tailored to the kernel
    from compile_norm.ops.norm import rms_norm_backward_ref

    assert not backward_problems(*case, *rms_norm_backward_ref(*case))


def test_bounds_catch_wrong_gradients():
    from compile_norm.ops.norm import rms_norm_backward_ref

    case = make_case(37, 384, torch.bfloat16)
    dx, dw = rms_norm_backward_ref(*case)
    wrong_dx = dx.clone()
    wrong_dx[3, 7] = wrong_dx[3, 7] * 1.02 + 0.01
    assert any(p.startswith("dx") for p in backward_problems(*case, wrong_dx, dw))
    no_rstd3 = rms_norm_backward_ref(*case[:5], 383)  # variance over one column fewer
    assert backward_problems(*case, *no_rstd3)
    assert any(p.startswith("dweight") for p in backward_problems(*case, dx, dw * 1.01))


def test_autograd_matches_reference_cpu():
    from compile_norm.ops.norm import rms_norm_backward_ref

    grad, x, w, eps, offset, vsize = make_case(6, 96, torch.bfloat16, weight="fp32", offset=1.0, vsize=50)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    cn.rms_norm(xr, wr, eps, offset, vsize).backward(grad)
    dx, dw = rms_norm_backward_ref(grad, x, w, eps, offset, vsize)
    assert torch.equal(xr.grad, dx) and torch.equal(wr.grad, dw)


@pytest.mark.parametrize("bad,match", [
    ("grad_shape", "grad must have the shape of x"),
    ("grad_dtype", "grad must have the dtype of x"),
    ("weight_shape", "weight must have shape"),
    ("grad_residual", "grad_residual must have the dtype of x"),
])
def test_bad_arguments_raise(bad, match):
    grad, x, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    if bad == "grad_residual":
        with pytest.raises(ValueError, match=f"compile_norm.rms_norm_backward: {match}"):
            cn.rms_norm_backward(grad, x, w, EPS, grad_residual=grad.half())
        return
    if bad == "grad_shape":
        grad = torch.randn(3, 8)
    elif bad == "grad_dtype":
        grad = grad.to(torch.bfloat16)
    else:
        w = torch.randn(8)
    with pytest.raises(ValueError, match=f"compile_norm.rms_norm_backward: {match}"):
        cn.rms_norm_backward(grad, x, w, EPS)


def test_backward_op_compiles_to_generated_code():
    # called directly in a compiled function, the op is inlined (its reference: generated
    # code), as every compile_norm op is
    from compile_helpers import compile_run

    grad, x, w, eps, offset, vsize = make_case(6, 40, torch.float32, offset=1.0, vsize=24)
    fn = lambda g, x, w: cn.rms_norm_backward(g, x, w, eps, offset, vsize)  # noqa: E731
    c = compile_run(fn, grad, x, w, dynamic=False, options={"strict": True})
    assert "torch.ops.compile_norm" not in c.code
    want = fn(grad, x, w)
    torch.testing.assert_close(c.out[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.out[1], want[1], rtol=1e-5, atol=1e-5)


def test_training_backward_is_traced_as_the_backward_op():
    # what AOTAutograd records for the forward op's backward: one rms_norm_backward node (the
    # compile_norm backend lowers it); with Inductor's decompositions (stock torch.compile)
    # the op's reference is inlined instead: ATen ops, no compile_norm node
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.compilers import nop
    from torch._inductor.decomposition import select_decomp_table

    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)

    def backward_targets(**kw):
        graphs = []

        def keep(gm, _):
            graphs.append(gm)
            return nop(gm, _)

        f = aot_function(lambda x, w: cn.rms_norm(x, w, EPS), fw_compiler=keep, bw_compiler=keep, **kw)
        f(x, w).sum().backward()
        return {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}

    targets = backward_targets()
    assert "compile_norm.rms_norm_backward.default" in targets and not any("rsqrt" in t for t in targets), targets
    targets = backward_targets(decompositions=select_decomp_table())
    assert not any("compile_norm" in t for t in targets), targets
    assert any("rsqrt" in t for t in targets), targets


# --- CUDA ---------------------------------------------------------------------------------


def _cuda_case(tokens, hidden, dtype=torch.bfloat16, **kw):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in make_case(tokens, hidden, dtype, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,hidden", [(8192, 4096), (4096, 5376), (37, 1000), (3, 65536)])
@pytest.mark.parametrize("variant", ["llama", "gemma_vsize", "no_weight", "3d_nc"])
def test_cuda_kernel(tokens, hidden, variant):
    from compile_norm.ops import registry

    kw = {"llama": {}, "gemma_vsize": {"weight": "fp32", "offset": 1.0, "vsize": hidden // 2},
          "no_weight": {"weight": None}, "3d_nc": {"layout": "3d_nc"}}[variant]
    case = _cuda_case(tokens, hidden, **kw)
    assert registry.which_provider("rms_norm_backward", *case) == "triton"
    dx, dw = cn.rms_norm_backward(*case)
    problems = backward_problems(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in case),
                                 dx.cpu(), None if dw is None else dw.cpu())
    assert not problems, problems


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_kernel_dtypes(dtype):
    case = _cuda_case(513, 2304, dtype)
    dx, dw = cn.rms_norm_backward(*case)
    cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in case)
    assert not backward_problems(*cpu, dx.cpu(), dw.cpu())


@pytest.mark.cuda
def test_cuda_autograd_uses_the_kernel():
    from compile_norm.kernels import triton_backward

    launches = []
    real = triton_backward._launch

    def counting(grid, kernel, *args):
        launches.append(kernel)
        return real(grid, kernel, *args)

    triton_backward._launch = counting
    try:
        grad, x, w, eps, offset, vsize = _cuda_case(8192, 4096)
        g_res = torch.randn_like(grad)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, h = cn.fused_add_rms_norm(xr, torch.zeros_like(x), wr, eps)
        torch.autograd.backward((y, h), (grad, g_res))
    finally:
        triton_backward._launch = real
    assert len(launches) == 2  # the backward kernel (grad_residual added in it) + dweight sum
    dx, dw = cn.rms_norm_backward(grad, x, w, eps)
    assert torch.equal(xr.grad, dx + g_res) and torch.equal(wr.grad, dw)


if __name__ == "__main__":
    _child()
