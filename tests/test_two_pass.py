"""Per-tensor dynamic FP8 (fp8_dynamic_tensor) as two launches of the row kernel
(kernels/two_pass.py), through the Triton interpreter (a child process: see
test_kernels_interpret.py): tolerances of compile_norm.kernels.checking (every scale form:
the scheme's variants), the quantization alone bit for bit for every scale form, two
launches per call."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from helpers import count_kernel_launches, interpreter_report


def _child() -> None:
    import torch

    import compile_norm  # noqa: F401
    from compile_norm.kernels import checking, triton_ops, two_pass
    from compile_norm.ops import registry
    from compile_norm.ops.quant import SCHEMES
    from helpers import assert_bitwise_equal

    assert triton_ops.INTERPRET and triton_ops.SUPPORTED, triton_ops.REASON
    launches = count_kernel_launches(triton_ops)
    ops = list(two_pass.PASSES)
    cases = checking.default_cases(dtypes=(torch.bfloat16, torch.float32), hiddens=(128, 1400),
                                   tokens=5, ops=ops)
    results = []
    for case in cases:
        before = launches[0]
        try:
            res = checking.run_case(case, "cpu")
            problems = res.problems
        except Exception as e:  # report, don't stop the run
            problems = [f"{type(e).__name__}: {e}"]
        expected = 0 if 0 in case.shape else 2
        if launches[0] - before != expected:
            problems.append(f"{launches[0] - before} kernel launches, expected {expected}")
        results.append({"name": case.name(), "problems": problems})
    # the quantization alone, for every scale form (the scheme's variants): bit for bit, NaN
    # and inf included (a NaN row makes the tensor's scale NaN in both)
    x = torch.randn(6, 1400) * 30
    x[2, 7], x[4, 9] = float("nan"), float("inf")
    forms = [{}, *({k: v for k, v in var.items() if k not in ("dtype", "shape")}
                   for var in SCHEMES["fp8_dynamic_tensor"].variants)]
    provider = registry.providers("quant_fp8_dynamic_tensor")["triton"].fn
    reference = registry.ops()["quant_fp8_dynamic_tensor"].reference
    for how in forms:
        for t in (x[:, :1000], x[3:4].clone().fill_(0.0), x[:5, :300].clone(),
                  x[:5, :300].bfloat16(), x[:0]):
            name = f"quant bitwise {tuple(t.shape)} {t.dtype} {how}"
            try:
                assert_bitwise_equal(provider(t, **how), reference(t, **how), nan_equal=True)
                results.append({"name": name, "problems": []})
            except AssertionError as e:
                results.append({"name": name, "problems": [str(e)]})
    dispatch = registry.which_provider("rms_norm_fp8_dynamic_tensor", x[:, :128].bfloat16(), None, 1e-6)
    print("REPORT" + json.dumps({"results": results, "dispatch": dispatch}))


@pytest.fixture(scope="module")
def report():
    return interpreter_report(__file__, timeout=600)


def test_two_pass_kernel_matches_the_reference(report):
    assert len(report["results"]) > 40
    bad = [f"{r['name']}: {r['problems']}" for r in report["results"] if r["problems"]]
    assert not bad, "\n".join(bad)


def test_two_pass_is_the_triton_provider(report):
    assert report["dispatch"] == "triton"


@pytest.mark.cuda
def test_cuda_two_pass_matches_the_reference():
    import torch

    from compile_norm.kernels import checking, two_pass

    cases = checking.default_cases(dtypes=(torch.bfloat16, torch.float16), hiddens=(4096, 5376),
                                   tokens=64, ops=list(two_pass.PASSES))
    bad = [f"{r.name}: {r.problems}" for r in (checking.run_case(c, "cuda") for c in cases) if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.cuda
def test_cuda_two_pass_quantization_is_the_reference_bit_for_bit():
    """Each scale form: the two launches give the reference's codes and scale bit for bit."""
    import torch

    from compile_norm.ops import registry
    from compile_norm.ops.quant import SCHEMES
    from helpers import assert_bitwise_equal

    forms = [{}, *({k: v for k, v in var.items() if k not in ("dtype", "shape")}
                   for var in SCHEMES["fp8_dynamic_tensor"].variants)]
    x = torch.randn(300, 5376, device="cuda") * 30
    x[7, 3] = float("inf")
    provider = registry.providers("quant_fp8_dynamic_tensor")["triton"].fn
    reference = registry.ops()["quant_fp8_dynamic_tensor"].reference
    for how in forms:
        for t in (x, x.bfloat16(), x[:, :4096].half(), x[:0]):
            assert_bitwise_equal(provider(t, **how), reference(t, **how), nan_equal=True)


def test_traced_for_inductor_as_two_launches_and_the_tensor_scale():
    """What the lower pass inlines for a per-tensor op: pass 1's launch (the rows' scales),
    their max (their min for "inverse" scales) in torch ops, pass 2's launch with it, on fake
    CUDA tensors, every op's; library_ops.supports takes them."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from compile_norm.kernels import library_ops, two_pass
    from compile_norm.ops import registry

    if not library_ops.AVAILABLE:
        pytest.skip(library_ops.REASON)
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional as hop

    mode = FakeTensorMode()
    with mode:
        x, r, g = (torch.empty(37, 1400, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        w = torch.empty(1400, dtype=torch.bfloat16, device="cuda")
    inputs = {"quant_fp8_dynamic_tensor": (x,), "rms_norm_fp8_dynamic_tensor": (x, w, 1e-6),
              "fused_add_rms_norm_fp8_dynamic_tensor": (x, r, w, 1e-6),
              "rms_norm_gated_fp8_dynamic_tensor": (x, g, w, 1e-6)}
    assert set(inputs) == set(two_pass.PASSES)
    for name, given in inputs.items():
        for form, reduce in (({}, torch.ops.aten.amax.default),
                             ({"scale_form": "inverse", "min_scale": 1e-12, "clamp_amax": True},
                              torch.ops.aten.amin.default)):
            args = list(registry.spec(name).bind(given, form))
            assert library_ops.supports(name, *args), name
            with mode:
                gm = library_ops.functional_trace(library_ops.functions()[name], args)
            nodes = [n for n in gm.graph.nodes if n.target in (hop, reduce)]
            assert [n.target for n in nodes] == [hop, reduce, hop], (name, form, gm.code)
            # pass 1 writes the rows' scales, no quantized values; pass 2 the codes
            assert "q_ptr" not in nodes[0].kwargs["kwargs"] and "q_ptr" in nodes[2].kwargs["kwargs"]


PER_TENSOR_OPS = ("quant_fp8_dynamic_tensor", "rms_norm_fp8_dynamic_tensor",
                  "fused_add_rms_norm_fp8_dynamic_tensor", "rms_norm_gated_fp8_dynamic_tensor")


@pytest.mark.parametrize("name", PER_TENSOR_OPS)
@pytest.mark.parametrize("hidden", [4096, 5376, 8192])
def test_both_passes_take_one_launch_config(name, hidden):
    """Pass 2 recomputes the norm that pass 1 took the amax of: both launches must reduce in
    the same tree (rows per program, tiles, warps), or a row's y may differ by a bit between
    them. A static FP8 launch alone takes twice the warps of a per-token one (which reduces
    an amax) at 4096 and 8192 columns; pass 2 must not."""
    import torch

    from compile_norm.kernels import triton_ops, two_pass
    from compile_norm.ops import registry

    assert set(two_pass.PASSES) == set(PER_TENSOR_OPS)
    spec = registry.spec(name)
    x, r = (torch.randn(4, hidden, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(hidden, dtype=torch.bfloat16)
    given = {"quant_fp8_dynamic_tensor": (x,), "rms_norm_fp8_dynamic_tensor": (x, w, 1e-6),
             "fused_add_rms_norm_fp8_dynamic_tensor": (x, r, w, 1e-6),
             "rms_norm_gated_fp8_dynamic_tensor": (x, r, w, 1e-6)}[name]
    seen = []

    def launch(op, args, store_q=True):  # prepared as the eager provider does, not launched
        plan = triton_ops.prepare(op, args, store_q)
        seen.append((op.name, plan.consts[:7], plan.num_warps))  # rows per program, tiles
        return plan.outputs

    two_pass.run(name, spec.bind(given, {}), launch)
    (first, one, warps1), (second, two, warps2) = seen
    assert (first, second) == two_pass.PASSES[name]
    assert (one, warps1) == (two, warps2), seen
    if hidden != 5376:  # one tile: the static scheme alone would take twice the warps
        static = registry.spec(second)
        call = spec.split(spec.bind(given, {}))._replace(residual=None,
                                                        qargs=(torch.tensor(0.1), "divide"))
        assert triton_ops.prepare(static, static.join(call)).num_warps == 2 * warps2


def test_scales_only_launch_is_refused_where_the_kernel_must_store_codes():
    """store_q=False leaves q unwritten: only the per-token dynamic modes can skip their
    quantize stores; a static or per-group scheme says so instead of writing nothing."""
    import torch

    from compile_norm.kernels import library_ops, triton_ops
    from compile_norm.ops import registry

    if not library_ops.AVAILABLE:
        pytest.skip(library_ops.REASON)
    x, w = torch.randn(8, 256, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16)
    dynamic = registry.spec("rms_norm_fp8_dynamic")
    launch = triton_ops.prepare(dynamic, dynamic.bind((x, w, 1e-6), {}), store_q=False)
    assert launch.args[5] is None and launch.args[6] is not None  # no q pointer; the scales
    static = registry.spec("rms_norm_fp8_static")
    with pytest.raises(ValueError, match="store_q=False needs a per-token dynamic scheme"):
        triton_ops.prepare(static, static.bind((x, w, 1e-6, torch.tensor(0.1)), {}), store_q=False)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    _child()
