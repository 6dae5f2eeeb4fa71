"""The CPU dry run of benchmarks/e2e_fp8_layer.py: the FP8 decoder layer at tiny shapes (a float
matmul stands in for _scaled_mm where the CPU build lacks it) compiles with both backends,
compile_norm fuses both norms with their residual adds and FP8 quantizations, and the results
files are written."""

import json
import os
import subprocess
import sys
from helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run(tmp_path):
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "e2e_fp8_layer.py"), "--dry-run",
         "--tokens", "5", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "all fused and correct" in r.stdout, r.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = data["rows"]
    assert row["tokens"] == 5 and row["fusion_ok"]
    fused = row["compile_norm"]["fused"]
    for key, n in {"canonicalize_matched": 2, "residual_matched": 2, "quant_matched": 2}.items():
        assert fused.get(key) == n, fused
    # the backend rounds where eager rounds (emulate_precision_casts): at least as close to
    # eager as stock Inductor, which keeps fp32 in between
    assert row["compile_norm"]["rel_err_vs_eager"] <= row["inductor"]["rel_err_vs_eager"] + 1e-3, row
    assert not row["inductor"]["fused"]  # stock Inductor runs none of the passes
    assert row["compile_norm"]["kernels"] >= 1 and row["inductor"]["kernels"] >= 1
    assert "| 5 |" in (tmp_path / "results.md").read_text()


def test_bad_tokens():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "e2e_fp8_layer.py"), "--dry-run",
         "--tokens", "0"],
        capture_output=True, text=True, env=child_env(), timeout=300,
    )
    assert r.returncode != 0 and "--tokens must be positive" in r.stderr
