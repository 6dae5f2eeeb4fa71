"""The Triton kernels on CPU through the Triton interpreter (no GPU needed).

TRITON_INTERPRET must be set before triton is imported, so the cases run in one child
process (this file run as a script); the tests here read its report. The child checks that
every call really launched the kernel (a counting wrapper around it) and that ops called
through ``torch.ops.compile_norm`` dispatch to "triton" for CPU tensors in this mode.

Interpreter-only differences from the GPU path (see triton_kernel.py): casts to bf16/fp8 are
done by exact bit arithmetic (the interpreter's own casts truncate) and libdevice calls are
replaced by exact numpy-backed equivalents; division by a Python number is a true division
as on CPU torch. Tolerances are those of compile_norm.kernels.checking.
"""

from __future__ import annotations

import json

import pytest

from helpers import count_kernel_launches, interpreter_report

def _child() -> None:
    import torch

    import compile_norm  # noqa: F401
    from compile_norm.kernels import checking, triton_ops
    from compile_norm.ops import registry

    assert triton_ops.INTERPRET and triton_ops.SUPPORTED, triton_ops.REASON
    launches = count_kernel_launches(triton_ops)

    bf16 = torch.bfloat16
    # 1400 = 1024 + 256 + 128 (masked) and 1408 (fp8 groups) run the multi-tile path
    cases = checking.default_cases(dtypes=(bf16,), hiddens=(128, 300, 1400), tokens=5)
    cases += [
        c for c in checking.default_cases(dtypes=(torch.float16, torch.float32), hiddens=(1408,), tokens=3)
        if c.dtype != bf16
    ]
    results = []
    for case in cases:
        before = launches[0]
        try:
            res = checking.run_case(case, "cpu")
            ok, problems = res.ok, res.problems
        except Exception as e:  # report, don't stop the run
            ok, problems = False, [f"{type(e).__name__}: {e}"]
        expected = 0 if 0 in case.shape else 1
        if launches[0] - before != expected:
            ok = False
            problems.append(f"{launches[0] - before} kernel launches, expected {expected}")
        results.append({"op": case.op, "name": case.name(), "ok": ok, "problems": problems})

    # The weight read with x (EARLY_LOADS) or after the reduction (ptxas's schedule): the
    # same bits. Every op, both schedules, a split row and one of several rows per program,
    # rows past T masked.
    from helpers import assert_bitwise_equal

    schedules, seen, chosen = [], set(), triton_ops._early_loads
    for case in checking.default_cases(dtypes=(bf16,), hiddens=(96, 1400), tokens=19):
        if 0 in case.shape or (case.op, case.shape) in seen:  # one case of each op and shape
            continue
        seen.add((case.op, case.shape))
        spec = registry.spec(case.op)
        args, kwargs = checking.build_call(case, "cpu", seed=1)
        call = checking.positional(case.op, args, kwargs)
        try:
            outs, flags = [], []
            for early in (False, True):
                triton_ops._early_loads = lambda *a, early=early: early
                triton_ops._constexprs.cache_clear()  # (it derives EARLY_LOADS)
                outs.append(triton_ops.run(spec, call))
                flags.append(triton_ops.prepare(spec, call).const_kwargs()["EARLY_LOADS"])
            assert flags == [False, True], flags
            assert_bitwise_equal(outs[1], outs[0], nan_equal=True)
            schedules.append({"name": case.name(), "problems": []})
        except Exception as e:
            schedules.append({"name": case.name(), "problems": [f"{type(e).__name__}: {e}"]})
    triton_ops._early_loads = chosen
    triton_ops._constexprs.cache_clear()

    # The full op call dispatches to the kernel for CPU tensors in interpreter mode.
    x = torch.randn(3, 40, dtype=bf16)
    w = torch.randn(40, dtype=bf16)
    before = launches[0]
    provider = registry.which_provider("fused_add_rms_norm_fp8_dynamic", x, x, w, 1e-6)
    q, s, h = torch.ops.compile_norm.fused_add_rms_norm_fp8_dynamic(x, x, w, 1e-6)
    dispatch = {"provider": provider, "launches": launches[0] - before}
    print("REPORT" + json.dumps({"results": results, "dispatch": dispatch, "schedules": schedules}))


@pytest.fixture(scope="module")
def report():
    return interpreter_report(__file__, timeout=600)


def _ops():
    from compile_norm.kernels import checking

    return checking.all_ops()


@pytest.mark.parametrize("op", _ops())
def test_interpreter_matches_reference(report, op):
    mine = [r for r in report["results"] if r["op"] == op]
    assert len(mine) >= 10
    bad = [f"{r['name']}: {r['problems']}" for r in mine if not r["ok"]]
    assert not bad, "\n".join(bad)


def test_weight_read_early_or_late_gives_the_same_bits(report):
    """EARLY_LOADS (the weight read with x) and ptxas's schedule (the weight read after the
    reduction: static scales) give every op's outputs the same bits."""
    from compile_norm.kernels import checking

    names = {r["name"].split("[")[0] for r in report["schedules"]}
    assert names == set(checking.all_ops()), names ^ set(checking.all_ops())
    bad = [f"{r['name']}: {r['problems']}" for r in report["schedules"] if r["problems"]]
    assert not bad, "\n".join(bad)


def test_interpreter_dispatch_runs_the_kernel(report):
    assert report["dispatch"] == {"provider": "triton", "launches": 1}


if __name__ == "__main__":
    _child()
