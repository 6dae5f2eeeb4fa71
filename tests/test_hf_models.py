"""Real Hugging Face models compiled with the compile_norm backend: every RMSNorm site fuses.

Seven families (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text) built from tiny
two-layer configs with random weights (nothing downloaded), compiled once each with
``fullgraph=True`` (so a graph break fails the test) and checked through the pass counters in
``torch._dynamo.utils.counters["compile_norm"]`` and logits against eager.

Expected counts, derived from each architecture's forward (L = 2 layers):

- norms (``canonicalize_matched``): Llama, Mistral, Qwen2 and Gemma have ``input_layernorm`` and
  ``post_attention_layernorm`` per layer plus the final ``model.norm``: 2L + 1 = 5. Qwen3 adds
  ``q_norm`` and ``k_norm`` per layer: 4L + 1 = 9. Gemma 2 has input, post_attention,
  pre_feedforward and post_feedforward norms per layer: 4L + 1 = 9; Gemma 3 adds q/k norms:
  6L + 1 = 13.
- residual adds (``residual_matched``): a norm fuses its add only when its input *is* an add.
  Llama-like: layer 0's input norm reads the embeddings (no add); every later norm reads
  ``residual + sublayer_out`` (post_attention of each layer, input of layer 1, final): 2L = 4.
  q/k norms read the q/k projections (no add). Gemma's input norm of layer 0 reads the embedding
  times ``sqrt(hidden)`` (a mul, no add). Gemma 2/3: post_attention and post_feedforward norms
  read the sublayer output itself (their output is then added to the residual), so the adds
  feed pre_feedforward (each layer), input of layer 1 and the final norm: 2L = 4 again.
- Gemma ``1 + w`` weights (``gemma_matched``): every norm of the Gemma families, q/k included.
- sandwiches (``sandwich_matched``): Gemma 2/3 normalize each sublayer's output before adding
  it to the residual, and the sum's norm is then fused with it (``rms_norm_add_rms_norm``):
  post_attention -> pre_feedforward in each layer, post_feedforward -> the next layer's input
  norm or the final norm: 2L = 4.
- ``lower_matched``: every fused op (a residual fusion replaces a norm, a sandwich two norms
  by one op, so = norms - sandwiches).

Compilation disables the FX graph and AOT autograd caches (a cache hit would skip the passes and
their counters); the kernel code cache stays on to keep the file fast on a small CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters
from helpers import child_env

transformers = pytest.importorskip("transformers")

LAYERS = 2
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
            max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    norms: int
    residual: int = 2 * LAYERS
    gemma: bool = False  # norm weights are ``1 + w`` (HF initializes w to 0)
    sandwich: int = 0  # rms_norm -> add -> rms_norm sites
    extra: tuple = ()    # config overrides


FAMILIES = {
    "llama": Family(norms=2 * LAYERS + 1),
    "mistral": Family(norms=2 * LAYERS + 1),
    "qwen2": Family(norms=2 * LAYERS + 1),
    "qwen3": Family(norms=4 * LAYERS + 1),
    "gemma": Family(norms=2 * LAYERS + 1, gemma=True),
    # a sliding window shorter than the sequence, so local attention layers really mask
    "gemma2": Family(norms=4 * LAYERS + 1, gemma=True, sandwich=2 * LAYERS,
                     extra=(("sliding_window", 8),)),
    "gemma3_text": Family(norms=6 * LAYERS + 1, gemma=True, sandwich=2 * LAYERS,
                          extra=(("sliding_window", 8),)),
}

BATCH, SEQ = 2, 13  # a non-power-of-two sequence


class Logits(torch.nn.Module):
    """The causal LM without a KV cache, returning logits only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(model_type: str, attn: str = "eager") -> Logits:
    family = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **TINY, **dict(family.extra))
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError:  # no SDPA for this architecture (Gemma 2: logit soft-capping)
        if attn == "eager":
            raise
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random norm weights: HF starts them at 1 (or 0 for Gemma's 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if family.gemma else 1.0, 0.1)
    return Logits(model).eval()


@dataclass
class Compiled:
    eager: torch.Tensor
    out: torch.Tensor
    counts: dict
    graph_breaks: dict


def compile_model(model: torch.nn.Module, ids: torch.Tensor) -> Compiled:
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(ids)
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            out = torch.compile(model, backend="compile_norm", fullgraph=True)(ids)
    return Compiled(eager, out, dict(counters["compile_norm"]), dict(counters["graph_break"]))


_CACHE: dict = {}


def compiled(model_type: str, dtype=torch.float32, device="cpu", attn="eager") -> Compiled:
    """Each model compiles once per (dtype, device) for all the tests that look at it."""
    key = (model_type, dtype, device, attn)
    if key not in _CACHE:
        model = build(model_type, attn).to(device=device, dtype=dtype)
        torch.manual_seed(1)
        ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), device=device)
        _CACHE[key] = compile_model(model, ids)
    return _CACHE[key]


def check_fusion(model_type: str, c: Compiled) -> None:
    family = FAMILIES[model_type]
    counts = c.counts
    assert not c.graph_breaks, c.graph_breaks
    failed = {k: v for k, v in counts.items() if k.endswith("_failed")}
    assert not failed, failed
    unmatched = {k: v for k, v in counts.items() if k.startswith("canonicalize_unmatched") and v}
    assert not unmatched, f"norm sites left unfused: {unmatched}"
    assert counts.get("canonicalize_matched", 0) == family.norms, counts
    assert counts.get("residual_matched", 0) == family.residual, counts
    assert counts.get("gemma_matched", 0) == (family.norms if family.gemma else 0), counts
    assert counts.get("sandwich_matched", 0) == family.sandwich, counts
    assert counts.get("lower_matched", 0) == family.norms - family.sandwich, counts


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_fuses_every_norm_fp32(model_type):
    c = compiled(model_type)
    check_fusion(model_type, c)
    assert c.out.shape == (BATCH, SEQ, TINY["vocab_size"]) and c.out.dtype == torch.float32
    # fp32 throughout: only summation order differs (logits are O(1))
    torch.testing.assert_close(c.out, c.eager, rtol=1e-5, atol=1e-5)


def _bf16_errors(model_type, device, attn):
    """Errors of compiled and eager bf16 logits against the fp32 eager model on the same ids."""
    c = compiled(model_type, torch.bfloat16, device, attn)
    model = build(model_type, attn).to(device)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), device=device)
    with torch.no_grad():
        ref = model(ids).float()
    return c, (c.out.float() - ref).abs().max().item(), (c.eager.float() - ref).abs().max().item()


def _check_bf16(model_type, device, attn):
    c, err_compiled, err_eager = _bf16_errors(model_type, device, attn)
    check_fusion(model_type, c)
    assert c.out.dtype == torch.bfloat16
    # Compiled code keeps fp32 intermediates where eager rounds to bf16, so it is not bitwise
    # eager; it must be no further from the fp32 model than eager bf16 is (with some slack).
    assert err_compiled <= 1.5 * err_eager + 0.02, (err_compiled, err_eager)
    torch.testing.assert_close(c.out.float(), c.eager.float(), rtol=0.05, atol=0.1)


def test_bf16_cpu_gemma3():
    """bf16 on CPU for the family with the most norm kinds (q/k norms, 1 + w, 4 per layer)."""
    _check_bf16("gemma3_text", "cpu", "eager")


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_bf16_cuda(model_type):
    _check_bf16(model_type, "cuda", "sdpa")


def test_inspect_cli_hf_config():
    """The CLI path: ``compile-norm inspect --hf-config`` on a Qwen3 config (q/k norms)."""
    cfg = dict(TINY, model_type="qwen3")
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(
        [sys.executable, "-m", "compile_norm.cli", "inspect", "--hf-config", json.dumps(cfg),
         "--seq", "12", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout
    assert "Qwen3ForCausalLM (qwen3)" in out, out
    norms = FAMILIES["qwen3"].norms
    m = re.search(r"^counters: (.*)$", out, re.M)
    assert m, out
    counts = dict(kv.split("=") for kv in m.group(1).split(", "))
    assert counts["canonicalize_matched"] == str(norms), out
    assert counts["residual_matched"] == str(FAMILIES["qwen3"].residual), out
    assert re.search(r"^unfused sites: 0$", out, re.M), out
    # each norm site once, beside what each pass rewrote (a residual fusion rewrites a norm)
    assert re.search(rf"^fused sites: {norms} \(rewrites per stage: canonicalize {norms}, "
                     rf"residual {FAMILIES['qwen3'].residual}\)$", out, re.M), out
    assert re.search(r"^numerics out .* ok$", out, re.M), out
    assert "modeling_qwen3.py" in out, out
