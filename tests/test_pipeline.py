"""All passes together on model code written the Hugging Face way (canonicalize included)."""

import pytest
import torch

from compile_helpers import assert_close, assert_close_q, compile_run
from models import GemmaRMSNorm, LlamaBlockNorms, LlamaRMSNorm

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama_block_fuses_residual_adds(dtype):
    model = LlamaBlockNorms(40, dtype=dtype)
    x = torch.randn(2, 3, 40, dtype=dtype)
    c = compile_run(model, x, options={"strict": True})
    assert c.counts["canonicalize_matched"] == 3
    assert c.counts["residual_matched"] == 2
    assert "compile_norm" not in c.code
    assert_close(c.out, model(x), dtype)


class GemmaNormFp8(torch.nn.Module):
    def __init__(self, hidden, dtype):
        super().__init__()
        self.norm = GemmaRMSNorm(hidden, dtype=dtype)

    def forward(self, x, r):
        h = x + r
        y = self.norm(h)
        scale = (y.float().abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
        return (y.float() / scale).clamp(-448, 448).to(FP8), scale, h


def test_gemma_residual_fp8_dynamic_is_one_kernel():
    model = GemmaNormFp8(48, torch.bfloat16)
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    c = compile_run(model, x, r, options={"strict": True})
    assert c.counts["canonicalize_matched"] == 1
    assert c.counts["residual_matched"] == 1 and c.counts["quant_matched"] == 1
    assert c.ops("quant", "after") == {"fused_add_rms_norm_fp8_dynamic"}
    assert len(c.kernels) == 1
    q, s, h = c.out
    wq, ws, wh = model(x, r)
    assert_close_q(q, wq)
    assert_close(s, ws, torch.bfloat16)
    assert_close(h, wh, torch.bfloat16)
