"""The examples run (with --tiny) and print what fused and the time against stock torch.compile.

With the real backend they need "compile_norm" in torch._dynamo.list_backends() (the entry point
of an installed compile_norm with backend.py); until then those skip, and the stand-in backend
(tests/test_inspect_standin.py) keeps the example code itself tested.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "test_inspect_standin.py") + ":backend"

def _backend_problem():
    if "compile_norm" not in torch._dynamo.list_backends(exclude_tags=()):
        return "torch._dynamo.list_backends() lacks it"
    try:  # the entry point may be installed while compile_norm/backend.py is not there yet
        torch._dynamo.lookup_backend("compile_norm")
    except Exception as e:  # noqa: BLE001
        return f"loading it fails: {type(e).__name__}: {e}"
    return None


_PROBLEM = _backend_problem()
needs_backend = pytest.mark.skipif(
    _PROBLEM is not None,
    reason=f"the compile_norm torch.compile backend is not available yet ({_PROBLEM})",
)


def _has_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _fp8_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def run_example(name, *args):
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), "--tiny", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _fused_count(out):
    m = re.search(r"^fused sites: (\d+)(?: \(rewrites per stage: [\w ,]+\))?$", out, re.M)
    assert m, out
    return int(m.group(1))


def _norms_matched(out):
    """The norm sites canonicalize turned into ops (a sandwich later makes two of them one
    fused site, so the fused-site count can be lower)."""
    m = re.search(r"^fused sites: \d+ \(rewrites per stage: canonicalize (\d+)", out, re.M)
    assert m, out
    return int(m.group(1))


def _check_common(out):
    assert re.search(r"^time per call: .* us \[[\d.]+-[\d.]+\], stock torch.compile [\d.]+ us "
                     r"\[[\d.]+-[\d.]+\], .*candidates interleaved", out, re.M), out
    assert re.search(r"^  on (a CPU expect parity|CUDA the quantizing norms)", out, re.M), out
    assert "FAIL" not in out, out
    assert "warning:" not in out, out


@needs_backend
@pytest.mark.parametrize(
    "name, at_least",
    [
        ("llama_block.py", 3),  # 2 norms of the one tiny layer + the final norm
        ("gemma_block.py", 7),  # 4 norms + q/k norms + final norm
    ],
)
def test_block_examples(name, at_least):
    out = run_example(name)
    _check_common(out)
    # canonicalize turns every norm into an IR node (later passes fuse them further: a
    # residual add into one, Gemma's sandwich two into one)
    assert _norms_matched(out) >= at_least, out
    assert _fused_count(out) >= 1, out
    assert "compile_norm." in out


@needs_backend
def test_hf_example():
    out = run_example("hf_model.py")
    if not _has_transformers():
        assert "skipping the Hugging Face example" in out
        return
    _check_common(out)
    assert _fused_count(out) >= 1
    assert "logits diff vs eager: max abs" in out


@pytest.mark.skipif(_fp8_gpu(), reason="an FP8 GPU is present: test_fp8_example covers it")
def test_fp8_example_skips_without_fp8_gpu():
    out = run_example("fp8_block.py", "--device", "cpu")
    assert out.startswith("skipping the FP8 example: FP8 matmuls (torch._scaled_mm) need a CUDA GPU")


@needs_backend
@pytest.mark.cuda
def test_fp8_example():
    if not _fp8_gpu():
        pytest.skip("needs compute capability 8.9+ (H100) for torch._scaled_mm")
    out = run_example("fp8_block.py", "--device", "cuda")
    _check_common(out)
    assert _fused_count(out) >= 1


def test_llama_example_with_standin_backend():
    """The example code itself, before the real backend lands: the stand-in turns each
    hand-written norm into compile_norm.rms_norm, so all three sites must show."""
    out = run_example("llama_block.py", "--device", "cpu", "--backend", STANDIN)
    _check_common(out)
    assert _fused_count(out) == 3
    assert "compile_norm.rms_norm.default x3" in out
    assert "llama_block.py:" in out and "torch.rsqrt(variance + self.variance_epsilon)" in out
    assert "numerics out: max abs diff" in out and "(pass at" in out


@pytest.mark.skipif(not _has_transformers(), reason="transformers is not installed")
def test_hf_example_with_standin_backend():
    out = run_example("hf_model.py", "--device", "cpu", "--backend", STANDIN)
    _check_common(out)
    assert _fused_count(out) == 3  # one layer: two norms, plus the final norm
    assert "logits diff vs eager: max abs" in out


# ``compile-norm inspect <file>:<factory>`` as the examples' docstrings and the README offer it
_INSPECT_TARGET = re.compile(r"compile-norm inspect (examples/\w+\.py:\w+)")


def _offered_targets():
    found = set()
    for path in [os.path.join(ROOT, "README.md")] + [
        os.path.join(ROOT, "examples", f) for f in os.listdir(os.path.join(ROOT, "examples"))
        if f.endswith(".py")
    ]:
        with open(path) as f:
            found.update(_INSPECT_TARGET.findall(f.read()))
    return sorted(found)


@pytest.mark.parametrize("target", _offered_targets())
def test_offered_inspect_targets_are_factories(target, monkeypatch):
    from compile_norm.inspect import targets

    monkeypatch.chdir(ROOT)
    model, inputs, _ = targets.from_factory(target)  # a TargetError names what is wrong
    assert isinstance(model, torch.nn.Module) and inputs
