"""torch.export + AOTInductor: a model calling compile_norm ops, compiled ahead of time with the
compile_norm passes, packaged, loaded in a fresh process (which does not import compile_norm:
the package holds generated code only) and run there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from compile_helpers import assert_close, assert_close_q, no_caches
from compile_norm import lowerings
from compile_norm.backend import config_patches
from compile_norm.options import parse_options

cn = torch.ops.compile_norm
EPS = 1e-6


class Model(torch.nn.Module):
    def __init__(self, hidden, dtype):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dtype=dtype), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dtype=dtype), requires_grad=False)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype).requires_grad_(False)

    def forward(self, x, residual):
        y, h = cn.fused_add_rms_norm(x, residual, self.w1, EPS)
        y = self.proj(y)
        q, scale, h2 = cn.fused_add_rms_norm_int8_dynamic(y, h, self.w2, EPS, weight_offset=1.0)
        return q, scale, h2


def aoti_package(model, args, path):
    """Export, then AOT-compile with the compile_norm pass manager as Inductor's post-grad pass
    (as the backend does: same config patches, ops kept out of the decomposition table)."""
    ep = torch.export.export(model, args)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "compile_norm.fused_add_rms_norm.default" in names, names  # export keeps our ops
    counters.clear()
    with no_caches(), lowerings.keep_ops():
        return torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs=config_patches(parse_options({"strict": True}))
        )


LOADER = textwrap.dedent(
    """
    import sys, torch
    args = torch.load(sys.argv[2])
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    out = runner(*args)
    assert "compile_norm" not in sys.modules
    torch.save(tuple(t.cpu() for t in out), sys.argv[3])
    """
)


def run_export(tmp_path, device, dtype, hidden):
    torch.manual_seed(0)
    model = Model(hidden, dtype).to(device)
    args = (torch.randn(3, 5, hidden, dtype=dtype, device=device), torch.randn(3, 5, hidden, dtype=dtype, device=device))
    path = aoti_package(model, args, tmp_path / "model.pt2")
    assert os.path.exists(path)
    assert counters["compile_norm"]["lower_matched"] == 2  # both norms became generated code
    fresh = (torch.randn_like(args[0]), torch.randn_like(args[1]))  # not the export example
    torch.save(fresh, tmp_path / "args.pt")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the fresh process cannot import compile_norm
    p = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", LOADER, str(path), str(tmp_path / "args.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    if p.returncode < 0:  # torch 2.11 (GPU machine): also CPU packages
        why = plain_package_crashes(tmp_path, device)
        if why:
            pytest.skip(why)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    want = tuple(t.cpu() for t in model(*fresh))
    assert_close_q(got[0], want[0])
    assert_close(got[1], want[1], dtype)
    assert_close(got[2], want[2], dtype)


def plain_package_crashes(tmp_path, device) -> str:
    """Whether a package without compile_norm (Linear + LayerNorm) also dies loading in a fresh
    process here: then the crash is AOTInductor's on this machine, not ours (H100 run 7: torch
    2.11 segfaults in ``_load_aoti`` for such a package too)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(device)
    x = torch.randn(4, 64, device=device)
    path = torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)),
                                                    package_path=str(tmp_path / "plain.pt2"))
    code = "import sys, torch\ntorch._inductor.aoti_load_package(sys.argv[1])\n"
    p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300)
    if p.returncode < 0:
        return (f"AOTInductor {device} packages crash on load in a fresh process on this machine "
                f"(signal {-p.returncode}), also without compile_norm")
    return ""


def test_aoti_package_runs_in_fresh_process_cpu(tmp_path):
    run_export(tmp_path, "cpu", torch.float32, 40)


@pytest.mark.cuda
def test_aoti_package_runs_in_fresh_process_cuda(tmp_path):
    run_export(tmp_path, "cuda", torch.bfloat16, 320)
