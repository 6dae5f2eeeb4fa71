"""Tensor parallel: two CPU processes (gloo); a row-parallel linear whose all_reduce
(functional collective, traceable by Dynamo) feeds the residual add and a hand-written norm.
Compiled fullgraph with the backend, each rank still fuses the norm with the residual add and
computes what eager computes (and what one process computes with the full weight)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from helpers import child_env


RANK_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    rank, init, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import compile_norm  # noqa: F401
        from torch._dynamo.utils import counters

        EPS, H = 1e-6, 48
        torch.manual_seed(0)  # the same full tensors on both ranks
        x = torch.randn(2, 5, 2 * H)
        proj = torch.randn(2 * H, H) / 10
        residual = torch.randn(2, 5, H)
        nw = torch.randn(H)
        x_shard, proj_shard = x[..., rank * H:(rank + 1) * H], proj[rank * H:(rank + 1) * H]

        def block(x_shard, proj_shard, residual, nw):
            partial = x_shard @ proj_shard  # row-parallel linear: partial sums
            y = funcol.all_reduce(partial, "sum", dist.group.WORLD)
            h = y + residual
            hf = h.float()
            out = nw * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
            return out, h

        def single(x, proj, residual, nw):  # one process, full weight
            h = x @ proj + residual
            return nw * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)), h

        args = (x_shard, proj_shard, residual, nw)
        eager = [t.clone() for t in block(*args)]
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = torch.compile(block, backend="compile_norm", fullgraph=True,
                                     options={"strict": True})
            got = [t.clone() for t in compiled(*args)]
            got2 = [t.clone() for t in compiled(*args)]  # a second call (no recompile)
        full = single(x, proj, residual, nw)
        diff = lambda a, b: max(float((u - v).abs().max()) for u, v in zip(a, b))
        json.dump({
            "counts": dict(counters["compile_norm"]),
            "compiled_vs_eager": diff(got, eager),
            "repeat": diff(got2, got),
            "eager_vs_single": diff(eager, full),
        }, open(out_path, "w"))
    finally:
        dist.destroy_process_group()
    """
)


def test_norm_after_all_reduce_fuses_on_each_rank(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    env = child_env(OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), init, str(tmp_path / f"rank{rank}.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    logs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=400)
            logs.append(err)
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in logs)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        counts = r["counts"]
        assert counts.get("canonicalize_matched") == 1, counts
        assert counts.get("residual_matched") == 1, counts  # add after all_reduce fused with the norm
        assert r["compiled_vs_eager"] <= 1e-4, r
        assert r["repeat"] == 0.0, r
        assert r["eager_vs_single"] <= 1e-4, r
