"""The benchmark suite's CPU dry run: every candidate is built, run and checked (no timing)."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_dry_run_two_families(tmp_path):
    import suite

    rc = suite.main(["--dry-run", "--families", "rms_norm,rms_fp8_group128", "--shapes", "3x256",
                     "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "suite.json").read_text())
    rows = {(r["family"], r["candidate"]): r for r in data["rows"]}
    assert set(rows) == {
        ("rms_norm", "compile_norm"), ("rms_norm", "stock compile"), ("rms_norm", "compile_norm eager"),
        ("rms_norm", "F.rms_norm eager"), ("rms_fp8_group128", "compile_norm"),
        ("rms_fp8_group128", "stock compile"), ("rms_fp8_group128", "compile_norm eager"),
    }
    # eager dispatch (native provider on CPU) matches the reference within the op tolerance
    assert rows[("rms_fp8_group128", "compile_norm eager")]["check"] == "ok"
    # the compile_norm passes found the hand-written HF norm + group quantization and fused it
    fusion = rows[("rms_fp8_group128", "compile_norm")]["fusion"]
    assert fusion.get("canonicalize_matched", 0) == 1 and fusion.get("lower_matched", 0) == 1, fusion
    assert fusion.get("quant_matched", 0) == 1, fusion  # no-keepdim amax + unsqueeze(-1) form
    assert rows[("rms_norm", "stock compile")]["fusion"] == {}
    md = (tmp_path / "suite.md").read_text()
    assert "| 3x256 | rms_fp8_group128 |" in md and "compile_norm eager" in md


def test_timing_rows_and_tables_with_stand_in_timers(monkeypatch):
    """The timing path on CPU with stand-in timers: bandwidth ratios above 256 tokens,
    microseconds with the copy as the floor at or below."""
    import argparse

    import suite

    times = {}

    def fake_graph_time(fn):
        fn()
        return times.setdefault(len(times), 10.0 + len(times))

    monkeypatch.setattr(suite.G, "graph_time_us", fake_graph_time)
    monkeypatch.setattr(suite.G, "eager_time_us", lambda fn: 50.0)
    a = argparse.Namespace(device="cpu", dry_run=False, quick=False, no_compile=True, kernel_mode="kernel",
                           budget_s=None, tune=False, family_list=["rms_fp8_static", "rms_bwd"],
                           shape_list=[(300, 1024), (2, 1024)])
    rows = suite.run(a)
    big = [r for r in rows if r["shape"] == "300x1024"]
    copy = next(r for r in big if r["family"] == "copy")
    assert copy["graph_us"] == 10.0 and copy["ratio"] == 1.0
    eager = next(r for r in big if r["family"] == "rms_fp8_static" and r["candidate"] == "compile_norm eager")
    want = (3 * 300 * 1024 + 2 * 1024) / eager["graph_us"] / (4 * 300 * 1024 / 10.0)
    assert abs(eager["ratio"] - want) < 1e-9 and eager["check"] == "ok"
    bwd = next(r for r in big if r["family"] == "rms_bwd" and r["candidate"] == "compile_norm eager")
    assert abs(bwd["gbps"] - (10 * 300 * 1024 + 4 * 1024) / bwd["graph_us"] / 1e3) < 1e-9
    small = [r for r in rows if r["shape"] == "2x1024" and r["family"] != "copy"]
    assert small and all("ratio" not in r and r["graph_us"] > 0 and r["copy_us"] > 0 for r in small)
    md = suite.markdown({"torch": "t", "date": "d", "kernel_source": "k", "liger": "no"}, rows)
    assert "| 300x1024 | rms_fp8_static | 10.0 us |" in md and " us |" in md.split("| 2x1024 |")[1]


def test_training_benchmark_dry_run_add_norm(tmp_path):
    """benchmarks/training.py's CPU dry run on one shape, the compiled rows of the fused add
    (the pre-grad pass fuses the norm and its add; lowering="kernel" falls back to generated
    code off CUDA) and the eager rows of both families, all checked against fp32 autograd."""
    import training

    rc = training.main(["--dry-run", "--no-model", "--shapes", "3x384", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "training.json").read_text())
    rows = {(r["family"], r["candidate"]): r for r in data["ops"]}
    assert {c for f, c in rows} == {"compile_norm", "compile_norm kernel", "stock compile", "compile_norm eager"}
    assert all(r["check"] == "ok" for r in rows.values()), rows
    fusion = rows[("add_rms_bwd", "compile_norm")]["fusion"]
    assert fusion.get("pre_grad_canonicalize_matched") == 1 and fusion.get("pre_grad_residual_matched") == 1, fusion
    assert fusion.get("lower_matched") == 2, fusion  # the forward op and the backward op
    assert rows[("add_rms_bwd", "stock compile")]["fusion"] == {}


def test_backward_sweep_candidates_start_with_the_default():
    """benchmarks/backward_sweep.py tries the kernel's own launch config first (the row the
    others are checked against), then distinct configs, each in its warps / residency bounds."""
    import backward_sweep as S

    from compile_norm.kernels import triton_backward as B

    for hidden in (128, 2048, 5376):
        configs = S.candidates(hidden, warps=(8, 16), stages=(1, 3), per_sms=(1, 2))
        assert configs[0] == B.launch_config(hidden)
        assert len(set(configs)) == len(configs) > 1
        assert len({S.label(c) for c in configs}) == len(configs)
        for c in configs[1:]:
            assert 2 <= c.block_m * c.block_h // (32 * c.num_warps) <= 64
            assert 16 <= c.num_warps * c.programs_per_sm <= 64
