import subprocess
import sys

import torch

import compile_norm


def test_ops_are_registered():
    assert hasattr(torch.ops.compile_norm, "rms_norm")
    assert compile_norm.ops.rms_norm is not None


def test_cli_version():
    out = subprocess.run(
        [sys.executable, "-m", "compile_norm.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert compile_norm.__version__ in out.stdout
