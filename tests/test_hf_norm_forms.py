"""Norm modules of real Hugging Face families that return the normalization factor, or the
input times it without a weight, and leave the rest to the caller.

- DeepSeek V4 (``DeepseekV4UnweightedRMSNorm``) and GLM-5 Next (its copy):
  ``x * rsqrt(mean(x.float()**2) + eps).to(x.dtype)``. In float32 (their hyper-connection
  streams are float32) that is rms_norm without a weight: fused. On 16-bit input the factor is
  rounded before the multiply, which the op's contract (multiply in float32, round once) does
  not reproduce: left alone, with that reason.
- HY V4 (``HYV4UnweightedRMSNorm``) returns ``rsqrt(mean(x.float()**2) + eps).to(x.dtype)``
  alone. Where a caller multiplies the input by it the graph is a norm like any other: fused.
  HY V4's own hyper-connection multiplies ``F.linear(x, fn)`` by it: no op computes the factor
  alone (rewriting to ``F.linear(rms_norm(x), fn)`` would write and read x once more), so it is
  reported, naming what the factor scales.

Real transformers classes, compiled with the compile_norm backend; outputs against eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compile_helpers import assert_close, compile_run

transformers = pytest.importorskip("transformers")


def _cls(module: str, name: str):
    mod = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    return getattr(mod, name)


UNWEIGHTED = {
    "deepseek_v4": ("deepseek_v4", "DeepseekV4UnweightedRMSNorm"),
    "glm5_next": ("glm5_next", "Glm5NextTextUnweightedRMSNorm"),
}


def _fused(c, sites=1):
    assert c.counts["canonicalize_matched"] == sites and c.counts["canonicalize_unmatched"] == 0, c.counts
    assert c.ops("canonicalize", "after") == {"rms_norm"}
    assert "compile_norm" not in c.code  # lowered (generated code on CPU)


def _left_alone(c, words):
    assert c.counts["canonicalize_matched"] == 0, c.counts
    reasons = [k for k in c.counts if k.startswith("canonicalize_unmatched: ")]
    assert len(reasons) == 1 and words in reasons[0], reasons


@pytest.mark.parametrize("family", list(UNWEIGHTED))
def test_unweighted_norm_fuses_in_float32(family):
    norm = _cls(*UNWEIGHTED[family])(eps=1e-6)
    for shape in ((3, 5, 72), (7, 40)):  # 3-D and 2-D, non-power-of-two hidden sizes
        x = torch.randn(shape)
        c = compile_run(norm, x)
        _fused(c)
        assert_close(c.out, norm(x), torch.float32)


@pytest.mark.parametrize("family", list(UNWEIGHTED))
def test_unweighted_norm_on_bf16_keeps_its_rounding(family):
    norm = _cls(*UNWEIGHTED[family])(eps=1e-6)
    x = torch.randn(3, 5, 72, dtype=torch.bfloat16)
    c = compile_run(norm, x)
    _left_alone(c, "rsqrt rounded to bfloat16 before it multiplies")
    assert_close(c.out, norm(x), torch.bfloat16)


def test_factor_only_norm_times_its_input_fuses():
    norm = _cls("hy_v4", "HYV4UnweightedRMSNorm")(eps=1e-6)

    def caller(x):  # the module returns the factor; the multiply is the caller's
        return x * norm(x)

    x = torch.randn(2, 9, 48).transpose(0, 1)  # non-contiguous
    c = compile_run(caller, x)
    _fused(c)
    assert_close(c.out, caller(x), torch.float32)


def test_hy_v4_hyper_connection_reports_the_factor_it_cannot_fuse():
    hy = pytest.importorskip("transformers.models.hy_v4.modeling_hy_v4")
    config = transformers.AutoConfig.for_model("hy_v4", hidden_size=32, hc_mult=2)
    torch.manual_seed(0)
    hc = hy.HYV4HyperConnection(config)
    with torch.no_grad():
        for p in hc.parameters():
            p.normal_()
    streams = torch.randn(2, 5, 2, 32)
    with torch.no_grad():
        c = compile_run(hc, streams)
        want = hc(streams)
    _left_alone(c, "multiplies another tensor (aten.mm.default)")
    for got, ref in zip(c.out, want):
        assert_close(got, ref, torch.float32)


def test_factor_scaling_a_linear_is_reported_not_rewritten():
    """The HY V4 form written out: the graph keeps F.linear(x) * factor."""
    norm = _cls("hy_v4", "HYV4UnweightedRMSNorm")(eps=1e-6)
    w = torch.randn(4, 40)

    def mixes(x):
        return F.linear(x, w) * norm(x)

    x = torch.randn(6, 40)
    c = compile_run(mixes, x)
    _left_alone(c, "no op computes the factor alone")
    assert c.ops("canonicalize", "after") == set()
    assert_close(c.out, mixes(x), torch.float32)
