"""``compile-norm inspect --train`` (``inspect_model(train=True)``): a training step's graphs.

The real backend on two real targets, a hand-written Llama-style block (examples/llama_block.py,
hidden 96, 3-D input) and a Hugging Face Llama from a tiny config, each compiled once with the
CLI in this process: the report names the pre-grad, forward and backward graphs, the forward
holds one compile_norm op per norm of the model, the backward one ``rms_norm_backward`` per
norm, what each op became at the lower pass, the kernels of each graph, and the loss and every
gradient group against eager (fp32: within 1e-5 of the gradient's scale, as in
tests/test_training_hf.py). Then a backend whose gradients are wrong (the check must fail), the
targets that cannot train (one error line, before any compile), a function whose trainable
tensor is an input, and the train-mode helpers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest
import torch

from compile_norm.cli import main
from compile_norm.inspect import inspect_model, targets
from compile_norm.inspect.core import _train_mode, _train_warnings
from test_inspect_cli import FACTORIES as CLI_FACTORIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = os.path.join(ROOT, "examples", "llama_block.py") + ":tiny_cpu"
FP32_GRAD_RTOL = 1e-5  # the fp32 bound; the report's own limit (rtol 1e-3) is looser

# test_inspect_cli.py's factories (its Norm module and good()), and targets that cannot train
FACTORIES = CLI_FACTORIES + '''

def frozen():
    model = Norm()
    model.requires_grad_(False)
    return model, torch.randn(6, 40)


def plain_function():
    return (lambda x: x * 2), torch.randn(3)


class Argmax(Norm):
    def forward(self, x):
        return super().forward(x).argmax(-1)


def int_output():
    return Argmax(), torch.randn(6, 40)


class Flag(Norm):
    def forward(self, x):
        return bool(super().forward(x).sum() > 0)


def bool_output():
    return Flag(), torch.randn(6, 40)


class Detached(Norm):
    def forward(self, x):
        return super().forward(x).detach()


def detached_output():
    return Detached(), torch.randn(6, 40)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


def grad_scaling_backend(gm, example_inputs):
    """The forward exactly, every gradient 1.5 times too large."""
    def run(*args):
        return tuple(_ScaleGrad.apply(o) if isinstance(o, torch.Tensor) and o.requires_grad
                     else o for o in gm(*args))
    return run
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "train_factories.py"
    path.write_text(FACTORIES)
    return str(path)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", *argv])
    return rc, out.getvalue(), err.getvalue()


def _inspect_train(argv, out_dir):
    rc, stdout, stderr = _cli([*argv, "--train", "--device", "cpu", "--out", str(out_dir)])
    assert rc == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    data = json.loads((out_dir / "report.json").read_text())
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    return stdout, data, html


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    model, _, _ = targets.from_factory(BLOCK)
    norms = sum(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    params = sum(p.requires_grad for p in model.parameters())
    out = tmp_path_factory.mktemp("block")
    return (*_inspect_train([BLOCK], out), norms, params)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    import test_hf_models as hf

    cfg = {k: v for k, v in hf.TINY.items() if k != "num_hidden_layers"}
    out = tmp_path_factory.mktemp("hf")
    argv = ["--hf-config", json.dumps(dict(cfg, model_type="llama")), "--layers",
            str(hf.LAYERS), "--seq", "8"]
    return (*_inspect_train(argv, out), hf.FAMILIES["llama"].norms)


def _check_graphs(data, norms):
    """pre-grad, forward, backward: every norm an op before AOTAutograd and in the forward,
    one rms_norm_backward per norm in the backward, each lowered with a reason, kernels per
    graph adding up to the report's."""
    graphs = data["train"]["graphs"]
    assert [g["kind"] for g in graphs] == ["pre-grad", "forward", "backward"], graphs
    pre, fwd, bwd = graphs
    for g in (pre, fwd):
        assert sum(g["ir_ops"].values()) == norms, g
        assert set(g["ir_ops"]) <= {"rms_norm", "fused_add_rms_norm"}, g
    assert bwd["ir_ops"] == {"rms_norm_backward": norms}, bwd
    for g in (fwd, bwd):
        assert len(g["lowered"]) == norms, g
        for _, became, why in g["lowered"]:
            assert became in ("generated", "kernel") and why, g["lowered"]
        assert g["kernels"] > 0, g
    assert pre["kernels"] == 0
    assert sum(g["kernels"] for g in graphs) == len(data["kernels"])
    counts = data["counters"]
    assert counts["pre_grad_canonicalize_matched"] == norms, counts
    assert not any("unmatched" in k for k in counts), counts


def _check_numerics(data, params):
    train = data["train"]
    assert train["ok"] and data["numerics_ok"]
    assert train["loss_rule"] == "sum of the float32 output"
    assert train["trainable"] == params
    assert train["loss"]["ok"] and train["loss"]["max_rel"] <= FP32_GRAD_RTOL, train["loss"]
    assert sum(g["params"] for g in train["grads"]) == params
    for g in train["grads"]:
        assert g["ok"] and g["dtype"] == "float32", g
        assert 0 <= g["max_rel"] <= FP32_GRAD_RTOL, g


def test_block_graphs(block):
    _, data, _, norms, _ = block
    _check_graphs(data, norms)


def test_block_numerics(block):
    _, data, _, _, params = block
    _check_numerics(data, params)
    groups = {g["group"] for g in data["train"]["grads"]}
    # one group for each norm of every layer, for instance
    assert "layers.*.input_layernorm.weight" in groups and "norm.weight" in groups, groups


def test_block_text(block):
    stdout, data, _, norms, _ = block
    assert "training step: loss = sum of the float32 output, then loss.backward()" in stdout
    for g in data["train"]["graphs"]:
        assert f"  {g['label']}: {g['summary']}" in stdout
    assert re.search(rf"^  graph \S+ \(backward\): compile_norm ops rms_norm_backward x{norms} "
                     rf"-> generated x{norms} \(", stdout, re.M), stdout
    assert re.search(r"^  loss: eager \S+, compiled \S+: .* ok$", stdout, re.M), stdout
    assert re.search(r"^  gradients: \d+ groups \(\d+ tensors\): .*: ok$", stdout, re.M), stdout
    assert re.search(r"^    lowered  rms_norm_backward\S* = compile_norm.rms_norm_backward."
                     r"default -> generated \(.+\)$", stdout, re.M), stdout


def test_block_html(block):
    _, data, html, _, _ = block
    assert '<section id="train"><h2>Training step: forward and backward</h2>' in html
    assert "training step</div>" in html  # the card
    for g in data["train"]["graphs"]:
        assert g["label"] in html
    for g in data["train"]["grads"]:
        assert g["group"] in html
    assert "rms_norm_backward x" in html and "sum of the float32 output" in html
    assert html.count("<table") == html.count("</table>")


def test_hf_llama_training_step(hf_llama):
    stdout, data, html, norms = hf_llama
    assert "LlamaForCausalLM (llama)" in stdout
    _check_graphs(data, norms)
    params = sum(g["params"] for g in data["train"]["grads"])
    _check_numerics(data, params)
    assert "model.model.layers.*.post_attention_layernorm.weight" in {
        g["group"] for g in data["train"]["grads"]}
    assert "modeling_llama.py" in stdout  # fused sites keep their model source line
    assert '<section id="train">' in html


def test_wrong_gradients_fail_the_check(factories):
    rc, stdout, stderr = _cli([factories + ":good", "--train", "--device", "cpu",
                               "--backend", factories + ":grad_scaling_backend"])
    assert rc == 1, stdout + stderr
    assert "compiled outputs, loss or gradients differ from eager" in stderr
    assert re.search(r"^  loss: .* ok$", stdout, re.M), stdout  # the forward is exact
    assert re.search(r"^    w \(float32 x1\): max abs \S+, max rel 0\.5 FAIL$", stdout, re.M), stdout
    assert re.search(r"^  gradients: .*: FAIL in 1 group\(s\): w$", stdout, re.M), stdout


@pytest.mark.parametrize("target, words", [
    ("frozen", "cannot inspect a training step of frozen: no parameter and no input tensor "
               "requires grad"),
    ("plain_function", "no parameter and no input tensor requires grad"),
    ("int_output", "its output has no floating-point tensor to take a loss from (it holds: "
                   "int64 tensor)"),
    ("bool_output", "(it holds: bool)"),
    ("detached_output", "its output does not depend on any tensor requiring grad"),
])
def test_targets_that_cannot_train(factories, target, words):
    rc, stdout, stderr = _cli([f"{factories}:{target}", "--train", "--device", "cpu"])
    assert rc == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compile-norm: error: "), stderr
    assert words in lines[0]
    assert "Traceback" not in stderr and not stdout


def test_an_input_requiring_grad_is_trained():
    """A function's only trainable tensor is its second input: its gradient is compared (as
    ``input[1]``), the first input's is not; no norm, so the pre-grad pass keeps Dynamo's graph.
    ``bench`` times the whole step."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 24), torch.randn(24, 24, requires_grad=True)

    def proj(x, w):
        return torch.tanh(x @ w)

    report = inspect_model(proj, (x, w), train=True, bench=True, repeats=2)
    t = report.train
    assert t.ok and t.trainable == 1 and [g.group for g in t.grads] == ["input[1]"]
    assert t.grads[0].max_rel <= FP32_GRAD_RTOL
    assert [g.kind for g in report.graphs] == ["pre-grad", "forward", "backward"]
    assert report.graph_summary(0) == "compile_norm ops none; no norm matched: Dynamo's graph kept"
    assert w.grad is None  # the step's gradients were cleared
    assert report.bench.what == "training step (forward + backward)"
    assert re.search(r"^time per training step \(forward \+ backward\) \(cpu", report.to_text(),
                     re.M)


def test_train_mode_is_set_and_restored():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 4))
    model.eval()
    model[2].train()  # mixed modes come back as they were
    with _train_mode(model, True):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [False, False, False, True]
    with _train_mode(model, False):  # inference: left as it is
        assert not model.training
    (warning,) = _train_warnings(model)
    assert "dropout is active in train mode (1)" in warning
    model[1].p = 0.0
    assert _train_warnings(model) == []


def test_train_must_be_a_bool():
    with pytest.raises(ValueError, match="train must be a bool"):
        inspect_model(torch.nn.Linear(2, 2), torch.randn(1, 2), train="yes")


def test_a_training_graph_kept_by_the_pre_grad_pass_is_shown_with_its_reason():
    """Nothing re-traced (here: inputs without fake example values): the recorder still sees a
    pre-grad graph, Dynamo's, and a ``pre_grad`` stage whose error says why it was kept."""
    from compile_norm.inspect.record import StageRecorder
    from compile_norm.inspect.report import InspectReport
    from compile_norm.passes.base import observe_stages
    from compile_norm.passes.pre_grad import PreGradPass

    gm = torch.fx.symbolic_trace(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    (ph,) = gm.graph.find_nodes(op="placeholder")
    ph.meta["example_value"] = torch.randn(3, 8, requires_grad=True)  # real, not fake
    recorder = StageRecorder()
    with observe_stages(recorder), torch.enable_grad():
        PreGradPass()(gm.graph)
    (g,) = recorder.graphs
    assert g.kind == "pre-grad" and [st.name for st in g.stages] == ["pre_grad_input", "pre_grad"]
    assert g.stages[1].error == "graph inputs have no fake example values"
    report = InspectReport("m", "compile_norm", {}, "cpu", torch.__version__, graphs=[g])
    assert report.graph_summary(0) == ("compile_norm ops none; left to the post-grad passes: "
                                       "graph inputs have no fake example values")
    with torch.no_grad():  # an inference graph never enters the pass: nothing observed
        recorder = StageRecorder()
        with observe_stages(recorder):
            PreGradPass()(gm.graph)
        assert recorder.graphs == []


@pytest.mark.cuda
def test_cuda_bf16_backward_lowered_to_the_kernel():
    """On the GPU, bf16, hidden 1024 (1 + 2 norms of a Llama-style layer), 512 tokens: the
    lowering table takes the Triton backward kernels for ``rms_norm_backward``; the report says
    so for each node, the backward graph has the kernels, and the bf16 gradients pass."""
    blocks = targets.load_object(BLOCK.rpartition(":")[0] + ":LlamaBlocks")
    torch.manual_seed(0)
    model = blocks(1, 1024, 8, 4, 2048, max_pos=512).to("cuda", torch.bfloat16)
    x = torch.randn(1, 512, 1024, device="cuda", dtype=torch.bfloat16)
    report = inspect_model(model, (x,), train=True)
    assert report.train.ok, report.to_text()
    assert {g.dtype for g in report.train.grads} == {"bfloat16"}
    pre, fwd, bwd = report.graphs
    assert (pre.kind, fwd.kind, bwd.kind) == ("pre-grad", "forward", "backward")
    assert bwd.ir_ops() == {"rms_norm_backward": 3}, bwd.ir_ops()
    became = [s.lowered_to for s in bwd.lowered()]
    assert became == ["kernel"] * 3, [(s.lowered_to, s.why) for s in bwd.lowered()]
    assert sum(s.lowered_to == "kernel" for g in report.graphs for s in g.lowered()) == \
        report.counters.get("lower_triton_kernel", 0)
    names = [k.name for k in report.graph_kernels(2)]  # user-defined kernels keep their name
    assert any(n.startswith("rms_norm_backward_kernel") for n in names), names
    assert not any("rms_norm_backward_kernel" in k.name for k in report.graph_kernels(1))
    assert "-> kernel x3" in report.graph_summary(2)


def test_output_code_goes_to_the_graph_being_compiled():
    """Each output module is assigned to the graph whose stages came last from the compiling
    thread; code generated in another thread (a lowering measurement's candidate) is dropped."""
    import threading

    from torch._inductor.graph import GraphLowering

    from compile_norm.inspect.core import _run_and_get_code
    from compile_norm.inspect.record import StageRecorder

    graph = torch.fx.symbolic_trace(lambda x: x + 1).graph
    recorder = StageRecorder()

    def compile_twice():
        for name in ("first", "second"):
            recorder("input", graph)
            GraphLowering.save_output_code(f"{name} = async_compile.cpp_pybinding(['x'], '''')")
        worker = threading.Thread(target=GraphLowering.save_output_code, args=("candidate",))
        worker.start()
        worker.join()
        return "done"

    result, codes, owners = _run_and_get_code(compile_twice, recorder)
    assert result == "done" and [c.split(" ")[0] for c in codes] == ["first", "second"]
    assert owners == [0, 1]
