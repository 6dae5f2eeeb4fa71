"""Shared helpers for the operator-layer tests: bitwise comparison, scheme arguments, arg sets."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

cn = torch.ops.compile_norm

import compile_norm.ops  # noqa: E402  (the schemes, each from its file in ops/schemes/)

SCHEME_NAMES = tuple(compile_norm.ops.SCHEMES)
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (float8 has no torch.equal on CPU; bits also compare -0 vs 0)."""
    if t.dtype.is_floating_point:
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


def assert_bitwise_equal(actual, expected, nan_equal: bool = False) -> None:
    """Same shape, dtype and bits. ``nan_equal``: NaNs match by position, not payload."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_bitwise_equal(a, e, nan_equal)
        return
    if expected is None:  # an optional output (rms_norm_backward's dweight without weight)
        assert actual is None, actual
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    same = bits(actual) == bits(expected)
    if nan_equal and actual.dtype.is_floating_point:
        a_nan, e_nan = actual.float().isnan(), expected.float().isnan()
        assert torch.equal(a_nan, e_nan), "NaN positions differ"
        same |= a_nan
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{int((~same).sum())} of {same.numel()} elements differ; first at {bad}: "
            f"{actual[tuple(bad)].float().item()} != {expected[tuple(bad)].float().item()}"
        )


def randn(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


def scheme_kwargs(scheme: str, hidden: int, variant: int = 0) -> dict:
    """Scheme arguments (by keyword) for a hidden size; ``variant`` picks a second setting."""
    if scheme == "fp8_static":
        # Small enough that some of a normalized row saturates at 448.
        return {"scale": torch.tensor(0.006 if variant else 0.02)}
    if scheme == "fp8_dynamic":
        return {"scale_ub": torch.tensor(1.5)} if variant else {}
    if scheme == "fp8_group":
        group = next(g for g in (128, 64, 32, 16, 8) if hidden % g == 0)
        return {"group_size": group, "column_major_scales": bool(variant), "use_ue8m0": bool(variant)}
    if scheme == "mxfp8":
        return {"scaling_mode": "rceil", "block_size": 64} if variant else {}
    if scheme == "int8_static":
        kw = {"scale": torch.tensor(0.011)}
        if variant:
            kw["azp"] = torch.tensor(5, dtype=torch.int32)
        return kw
    return {}


def op(name: str):
    return getattr(cn, name)


def opcheck_cases(name: str) -> list[tuple[str, tuple, dict]]:
    """A few (id, args, kwargs) sets per op for torch.library.opcheck: fp32/bf16, 2-D/3-D,
    with/without weight, offset, variance_size, group options and zero tokens."""
    h = 64
    x2 = randn(4, h)
    x3 = randn(3, 2, h, dtype=torch.bfloat16).transpose(0, 1)  # 3-D and non-contiguous
    x0 = randn(0, h)
    w32, w16 = randn(h), randn(h, dtype=torch.bfloat16)
    if name.startswith("quant_"):
        scheme = name[len("quant_"):]
        return [
            ("fp32_2d", (x2,), scheme_kwargs(scheme, h, 0)),
            ("bf16_3d", (x3,), scheme_kwargs(scheme, h, 1)),
            ("zero_tokens", (x0,), scheme_kwargs(scheme, h, 1)),
        ]
    if name.startswith("rms_norm_gated"):
        # (x, gate, weight, eps, <scheme args>, norm_before_gate, group_size / norm_group_size)
        scheme = name[len("rms_norm_gated_"):] or None
        group = "norm_group_size" if scheme else "group_size"

        def gated_kw(variant, **kw):
            return {**(scheme_kwargs(scheme, h, variant) if scheme else {}), **kw}

        return [
            ("fp32_2d_after", (x2, randn(4, h), w32, 1e-6), gated_kw(0)),
            ("bf16_3d_before_groups", (x3, randn(2, 3, h, dtype=torch.bfloat16), w32, 1e-6),
             gated_kw(1, norm_before_gate=False, **{group: 16})),
            ("fp32_no_weight_zero_tokens", (x0, randn(0, h), None, 1e-6),
             gated_kw(1, norm_before_gate=False)),
        ]
    if name == "rms_norm_add_rms_norm":  # (x, residual, x_weight, x_eps, weight, eps, ...)
        return [
            ("fp32_2d", (x2, randn(4, h), w32, 1e-6, w32, 1e-5), {}),
            ("bf16_3d_gemma", (x3, randn(*x3.shape, dtype=torch.bfloat16), w16, 1e-6, w32, 1e-6),
             {"x_weight_offset": 1.0, "weight_offset": 1.0}),
            ("fp32_no_weights_zero_tokens", (x0, randn(0, h), None, 1e-6, None, 1e-6), {}),
        ]
    # rms_norm_backward(grad, x, ...) takes a second activation-shaped tensor like fused add
    fused_add = name.startswith("fused_add_") or name == "rms_norm_backward"
    scheme = name.split("rms_norm_", 1)[1] if "rms_norm_" in name else None
    if name == "rms_norm_backward":
        scheme = None

    def args(x, w):
        return (x, randn(*x.shape, dtype=x.dtype), w, 1e-6) if fused_add else (x, w, 1e-6)

    def kw(variant, **norm):
        return {**(scheme_kwargs(scheme, h, variant) if scheme else {}), **norm}

    cases = [
        ("fp32_2d_weight", args(x2, w32), kw(0)),
        ("bf16_3d_gemma_varsize", args(x3, w16), kw(1, weight_offset=1.0, variance_size=48)),
        ("fp32_no_weight_zero_tokens", args(x0, None), kw(1)),
    ]
    if name == "rms_norm_backward":  # fused add's backward: + the grad of residual_out
        cases.append(("bf16_3d_grad_residual", args(x3, w16), {"grad_residual": randn(*x3.shape, dtype=x3.dtype)}))
    return cases


def qwen3_next_gated_norm(h: int, dtype, eps: float) -> torch.nn.Module:
    """transformers' Qwen3-Next gated norm (norm, then gate) with a random weight near 1."""
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    m = qwen3_next.Qwen3NextRMSNormGated(h, eps=eps).to(dtype)
    m.weight.data = (1 + 0.1 * torch.randn(h)).to(dtype)
    return m


def mamba2_gated_norm(h: int, group: int, dtype, eps: float, weight_dtype=None) -> torch.nn.Module:
    """transformers' Mamba-2 gated norm (gate, then a norm per group of ``group`` columns):
    ``Mamba2RMSNormGated``, ``MambaRMSNormGated`` in older transformers."""
    import inspect

    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    cls = getattr(mamba2, "Mamba2RMSNormGated", None) or getattr(mamba2, "MambaRMSNormGated")
    if "group_size" not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__module__}.{cls.__name__} has no group_size")
    m = cls(h, group_size=group, eps=eps).to(weight_dtype or dtype)
    m.weight.data = (1 + 0.1 * torch.randn(h)).to(weight_dtype or dtype)
    return m


def skip_without_cpu_rowwise_scaled_mm() -> None:
    """Skip where this torch's CPU ``_scaled_mm`` takes per-tensor scales only (torch 2.11;
    2.13 takes per-row ones): torchao's rowwise recipe runs on it."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError as e:
        pytest.skip(f"torch {torch.__version__}: CPU _scaled_mm has no per-row scales ({str(e)[:80]})")


def child_env(**extra: str) -> dict:
    """The environment of a child Python process: this checkout first on PYTHONPATH, what was
    there kept (the GPU machine finds its carried wheels through it)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, **extra, PYTHONPATH=path)


def _run_child(script: str, timeout: int) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of ``script`` run under TRITON_INTERPRET=1 (returncode
    None: killed at the timeout or at the session's end)."""
    proc = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=child_env(TRITON_INTERPRET="1"), cwd=ROOT)
    _CHILDREN.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, f"{err}\n{script}: killed after {timeout} s"
    finally:
        _CHILDREN.discard(proc)


_CHILDREN: set[subprocess.Popen] = set()
_AHEAD: dict[str, concurrent.futures.Future] = {}
_AHEAD_TIMEOUT = 900
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def start_interpreter_reports(scripts: list[str]) -> None:
    """Run these test files' interpreter children ahead, one at a time on a background thread,
    in this order (conftest: the order their tests were collected): the interpreter is
    single-threaded, and the serial test run leaves the machine's other core idle."""
    global _pool
    _pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="interpreter")
    for script in scripts:
        _AHEAD[str(pathlib.Path(script).resolve())] = _pool.submit(_run_child, script, _AHEAD_TIMEOUT)


def stop_interpreter_reports() -> None:
    """Cancel the children not started and kill the running one (the session is over)."""
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    for proc in list(_CHILDREN):
        proc.kill()


def interpreter_report(script: str, timeout: int) -> dict:
    """Run a test file as a script under TRITON_INTERPRET=1 (a fresh process: Triton picks the
    interpreter at import) and return the JSON it prints after ``REPORT``; the result of the
    child run ahead (``start_interpreter_reports``) if there is one."""
    pytest.importorskip("triton")
    ahead = _AHEAD.pop(str(pathlib.Path(script).resolve()), None)
    if ahead is not None and not ahead.cancel():  # started or done: wait for it
        code, out, err = ahead.result()
    else:
        code, out, err = _run_child(script, timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("REPORT")]
    assert code == 0 and lines, err[-3000:]
    return json.loads(lines[-1][len("REPORT"):])


def count_kernel_launches(triton_ops) -> list:
    """Wrap the row kernel that ``triton_ops`` launches: ``[count]`` of launches since."""
    launches = [0]
    real = triton_ops.K.norm_quant_kernel

    class Counting:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                launches[0] += 1
                return launch(*args, **kwargs)

            return run

    triton_ops.K = type("K", (), {"norm_quant_kernel": Counting()})
    return launches
