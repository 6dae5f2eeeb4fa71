"""torchao's FP8 on a tiny Hugging Face Llama, compiled with the compile_norm backend on the CPU:
the activation quantization after each norm fuses into rms_norm_fp8_dynamic /
fused_add_rms_norm_fp8_dynamic (per row) or the *_fp8_dynamic_tensor ops (per tensor, the
tensorwise recipe) with the scale arithmetic torchao computes, the logits stay those of
eager, and the op with the arguments read from the graph is torchao's quantization bit for
bit. Training graphs are compiled without
gradients here: with them the norm itself is not matched yet (its rsqrt is saved for the
backward: the training pre-grad pass's business, issue 12).

torchao's float8 inference config refuses to quantize without an FP8-capable GPU
(``_check_hardware_support``: a check about its matmul); the tests lift that check, as the
activation quantization it guards is plain torch and ``torch._scaled_mm`` runs on this CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from compile_helpers import cn, no_caches
from compile_norm.ops import registry
from compile_norm.passes.base import observe_stages
from helpers import assert_bitwise_equal, skip_without_cpu_rowwise_scaled_mm

transformers = pytest.importorskip("transformers")
torchao = pytest.importorskip("torchao")
from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_)
from torchao.quantization import quant_api, quant_primitives  # noqa: E402
from torchao.float8 import float8_utils  # noqa: E402
from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8  # noqa: E402

LAYERS = 1
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
            max_position_embeddings=64)


def tiny_llama(monkeypatch, quantize) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model("llama", **TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    for layer in model.model.layers:
        quantize(layer)
    return model


def compile_logits(model, ids, grad=False):
    """(compiled logits, compile_norm counters, ops after the quant pass)."""
    torch._dynamo.reset()
    counters.clear()
    ops: set = set()

    def observe(stage, graph, result):
        if stage == "quant":
            ops.update(str(n.target) for n in graph.nodes if n.op == "call_function")

    compiled = torch.compile(model, backend="compile_norm")
    with observe_stages(observe), no_caches(), torch.set_grad_enabled(grad):
        out = compiled(input_ids=ids, use_cache=False).logits
    return out, dict(counters["compile_norm"]), ops


def run_quantized(monkeypatch, quantize):
    """Compile the quantized tiny Llama without gradients; its logits must be eager's (FP8
    codes within one step: Inductor's norm keeps float32 where eager rounds). Returns the
    counters and the ops after the quant pass."""
    model = tiny_llama(monkeypatch, quantize)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
    out, counts, ops = compile_logits(model, ids)
    torch.testing.assert_close(out.float(), eager.float(), atol=0.1, rtol=0.05)
    return counts, ops


def inference(granularity):
    # set_inductor_config=False: torchao's default turns on coordinate-descent tuning for the
    # whole process, which would slow every later CUDA compile in this test worker
    return lambda layer: quantize_(layer, Float8DynamicActivationFloat8WeightConfig(
        granularity=granularity, set_inductor_config=False))


def training(recipe):
    return lambda layer: convert_to_float8_training(
        layer, config=Float8LinearConfig.from_recipe_name(recipe))


FUSED = {"compile_norm.rms_norm_fp8_dynamic.default",
         "compile_norm.fused_add_rms_norm_fp8_dynamic.default"}


@pytest.mark.parametrize("quantize", [inference(PerRow()), training("rowwise")],
                         ids=["inference_per_row", "training_rowwise"])
def test_activation_quantization_after_each_norm_fuses(monkeypatch, quantize):
    skip_without_cpu_rowwise_scaled_mm()
    counts, ops = run_quantized(monkeypatch, quantize)
    assert counts["quant_matched"] == 2 * LAYERS, counts  # input and post-attention norms
    assert counts.get("quant_unmatched", 0) == 0, counts
    assert FUSED <= ops, ops
    # the final add + norm feeds the unquantized head (o_proj / down_proj inputs, not norm
    # outputs, keep their own quantization)
    assert "compile_norm.fused_add_rms_norm.default" in ops


FUSED_TENSOR = {"compile_norm.rms_norm_fp8_dynamic_tensor.default",
                "compile_norm.fused_add_rms_norm_fp8_dynamic_tensor.default"}


@pytest.mark.parametrize("quantize", [inference(PerTensor()), training("tensorwise")],
                         ids=["inference_per_tensor", "training_tensorwise"])
def test_per_tensor_activation_quantization_after_each_norm_fuses(monkeypatch, quantize):
    counts, ops = run_quantized(monkeypatch, quantize)
    assert counts["quant_matched"] == 2 * LAYERS, counts  # input and post-attention norms
    assert counts.get("quant_unmatched", 0) == 0, counts
    assert FUSED_TENSOR <= ops and not ops & FUSED, ops


def torchao_inference_per_tensor(y):
    scale = quant_primitives._choose_scale_float8(y, list(y.shape), torch.float8_e4m3fn)
    return quant_primitives._quantize_affine_float8(y, scale, torch.float8_e4m3fn), scale


def torchao_training_tensorwise(y):
    scale = float8_utils.tensor_to_scale(y, torch.float8_e4m3fn)
    return hp_tensor_and_scale_to_float8(y, scale, torch.float8_e4m3fn)._data, scale


@pytest.mark.parametrize("quantize, torchao_quantize", [
    (inference(PerTensor()), torchao_inference_per_tensor),
    (training("tensorwise"), torchao_training_tensorwise),
], ids=["inference_per_tensor", "training_tensorwise"])
def test_per_tensor_op_is_torchaos_quantization_bit_for_bit(monkeypatch, quantize, torchao_quantize):
    """The fused op, with the scale arguments the pass read from torchao's graph, gives
    torchao's own codes and scale on fresh values (3-D, a non-power-of-two hidden size, an
    all-zero token, and a single token that is all zero: no minimum gives torchao's NaNs)."""
    model = tiny_llama(monkeypatch, quantize)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    nodes = []

    def observe(stage, graph, result):
        if stage == "quant":
            nodes.extend(n for n in graph.nodes if str(n.target) in FUSED_TENSOR)

    torch._dynamo.reset()
    with observe_stages(observe), no_caches(), torch.no_grad():
        torch.compile(model, backend="compile_norm")(input_ids=ids, use_cache=False)
    spec = registry.spec("rms_norm_fp8_dynamic_tensor")
    read = {tuple(registry.spec(n.target._schema.name.split("::")[1]).split(n.args).qargs)
            for n in nodes}
    assert len(read) == 1, read  # every site: the same arithmetic
    qargs = read.pop()
    assert len(qargs) == len(spec.scheme.parameters)
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 7, 64), (5, 96), (1, 200)]:
        for dtype in (torch.bfloat16, torch.float32):
            y = (torch.randn(shape, generator=gen) * 3).to(dtype)
            y[..., 0, :] = 0.0
            want_q, want_s = torchao_quantize(y)
            q, s = cn.quant_fp8_dynamic_tensor(y, *qargs)
            assert_bitwise_equal(q, want_q)
            assert_bitwise_equal(s, want_s.reshape(()))
