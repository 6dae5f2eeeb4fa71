import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compile_helpers import assert_close, cn, compile_run
from compile_norm.backend import compile_norm_backend, config_patches
from compile_norm.options import parse_options
from helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_listed_and_usable_without_importing_compile_norm():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "compile_norm" not in sys.modules
        assert "compile_norm" in torch._dynamo.list_backends()
        f = torch.compile(lambda x: (x.sin() * 2).sum(-1), backend="compile_norm", options={"strict": True})
        x = torch.randn(3, 8)
        torch.testing.assert_close(f(x), (x.sin() * 2).sum(-1))
        import compile_norm
        print(compile_norm.__file__)
        """
    )
    env = child_env()
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith(ROOT)


def test_bad_option_is_a_clear_value_error():
    f = torch.compile(lambda x: x + 1, backend="compile_norm", options={"lowerin": "kernel"})
    with pytest.raises(Exception, match="unknown option.*'lowerin'"):
        f(torch.randn(2))


def test_inductor_options_and_mode_pass_through():
    patches = config_patches(parse_options({"max_autotune": False, "epilogue_fusion": False}), mode="max-autotune-no-cudagraphs")
    assert patches["epilogue_fusion"] is False and patches["max_autotune"] is False  # options win over mode
    assert "post_grad_custom_post_pass" in patches


def test_inductor_option_applies():
    def norm(x, w):
        return cn.rms_norm(x, w, 1e-6)

    x, w = torch.randn(4, 24), torch.randn(24)
    c = compile_run(norm, x, w, options={"cpp.descriptive_names": "original_aten"})
    assert_close(c.out, norm(x, w), torch.float32)
    assert len(c.kernels) == 1


def test_direct_call_with_options_object():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 3, backend=lambda g, ex: compile_norm_backend(g, ex, parse_options({"strict": True})))
    x = torch.randn(5)
    torch.testing.assert_close(f(x), x * 3)


def test_training_backward_matches_eager():
    def layer(x, r, w):
        y, h = cn.fused_add_rms_norm(x, r, w, 1e-6)
        return (y * h).sum()

    x = torch.randn(4, 24, requires_grad=True)
    r = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(layer, backend="compile_norm", options={"strict": True})
    f(x, r, w).backward()
    got = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    layer(x, r, w).backward()
    for g, t in zip(got, (x, r, w)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)
