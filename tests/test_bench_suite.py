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
    assert rows[("rms_norm", "stock compile")]["fusion"] == {}
    md = (tmp_path / "suite.md").read_text()
    assert "| 3x256 | rms_fp8_group128 |" in md and "compile_norm eager" in md
