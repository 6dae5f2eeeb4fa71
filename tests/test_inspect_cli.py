"""``compile-norm inspect``: targets, flags, and one clear error line for every bad target."""

import json
import os
import subprocess
import sys

import pytest
import torch

from compile_norm.cli import main
from compile_norm.inspect import targets
from helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "test_inspect_standin.py") + ":backend"

FACTORIES = '''
import torch

class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(40))

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return (self.w * y).relu() + 1

def good():
    return Norm(), torch.randn(6, 40)

def good_tuple():
    return Norm(), (torch.randn(6, 40),)

def raises():
    raise RuntimeError("no weights here")

def not_a_pair():
    return Norm()

def triple():
    return Norm(), torch.randn(2), 3

def bad_model():
    return 5, (torch.randn(2),)

def bad_inputs():
    return Norm(), {"x": torch.randn(2)}

not_callable = 7

def broken_backend(gm, example_inputs):
    raise RuntimeError("the backend gave up\\nbecause of this second line")
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return str(path)


def _error(capsys, argv, code=2):
    rc = main(["inspect", *argv])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("compile-norm: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "target, words",
    [
        ("{dir}/missing.py:good", "no such file"),
        ("{f}:nope", "no attribute 'nope'"),
        ("{f}:raises", "RuntimeError: no weights here"),
        ("{f}:not_a_pair", "must return (model, example_inputs)"),
        ("{f}:triple", "of length 3"),
        ("{f}:bad_model", "not callable"),
        ("{f}:bad_inputs", "tensor or a tuple"),
        ("{f}:not_callable", "is not callable"),
        ("{f}", "must look like"),
        ("no_such_pkg_xyz.mod:build", "cannot import module"),
        ("json:loads_nope", "no attribute"),
    ],
)
def test_bad_targets(capsys, factories, target, words):
    target = target.format(f=factories, dir=os.path.dirname(factories))
    line = _error(capsys, [target, "--backend", STANDIN])
    assert words in line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["{f}:good", "--options", "{not json"], "--options: bad JSON"),
        (["{f}:good", "--options", "[1, 2]"], "JSON object"),
        ([], "give a TARGET"),
        (["{f}:good", "--hf-config", "{}"], "not both"),
        (["{f}:good", "--depyf"], "--depyf needs --out"),
        (["{f}:good", "--layers", "2"], "--layers goes with --hf-config"),
        (["--hf-config", "{\"hidden_size\": 8"], "bad JSON"),
        (["--hf-config", "{\"hidden_size\": 8}"], "model_type"),
        (["--hf-config", "/no/such/config.json"], "neither a JSON file"),
        (["--hf-config", "[1]"], "neither a JSON file"),
        (["{f}:good", "--backend", "no_such_backend_xyz"], "not registered"),
        (["{f}:good", "--backend", "{f}:nope"], "--backend"),
    ],
)
def test_bad_arguments(capsys, factories, argv, words):
    argv = [a.replace("{f}", factories) for a in argv]
    if "--backend" not in argv:
        argv += ["--backend", STANDIN]
    assert words in _error(capsys, argv)


def test_option_typo_found_before_the_model_is_built(capsys, factories):
    # the factory would raise if it were called: the options are checked first
    line = _error(capsys, [factories + ":raises", "--options", '{"lowring": "kernel"}'])
    assert "--options: compile_norm: unknown option(s) 'lowring'" in line
    assert "did you mean 'lowering'?" in line and "no weights here" not in line
    line = _error(capsys, [factories + ":raises", "--options", '{"strict": "yes"}'])
    assert "option 'strict' must be a bool (True or False), got 'yes'" in line


def test_failed_compile_keeps_its_whole_reason(capsys, factories):
    line = _error(capsys, [factories + ":good", "--backend", factories + ":broken_backend",
                           "--device", "cpu"], code=1)
    assert "failed: RuntimeError: the backend gave up because of this second line" in line


def test_hf_config_file_with_bad_content(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('["not", "an", "object"]')
    assert "must hold a JSON object" in _error(capsys, ["--hf-config", str(cfg)])


def test_cuda_without_gpu(capsys, factories):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA device" in _error(capsys, [factories + ":good", "--device", "cuda"])


def test_inspect_a_factory_in_process(capsys, factories, tmp_path):
    out = tmp_path / "out"
    rc = main(["inspect", factories + ":good_tuple", "--backend", STANDIN, "--out", str(out),
               "--options", '{"strict": true}', "--graphs", "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "fused   rms_norm" in stdout and "compile_norm.rms_norm.default x1" in stdout
    assert "[graph 0/0 (forward) / canonicalize]" in stdout  # --graphs
    assert "report.html" in stdout
    data = json.loads((out / "report.json").read_text())
    assert data["options"] == {"strict": True} and data["title"] == "good_tuple"
    assert (out / "graph0_1_canonicalize.txt").exists()


def test_cli_subprocess_end_to_end(factories, tmp_path):
    """The console path as a user runs it: exit 0, summary on stdout, --code, --depyf."""
    out = tmp_path / "o"
    env = child_env(OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "compile_norm.cli", "inspect", factories + ":good",
         "--backend", STANDIN, "--code", "--out", str(out), "--depyf", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[kernel " in r.stdout and "numerics out" in r.stdout and " ok" in r.stdout
    assert os.listdir(out / "depyf")
    assert (out / "report.html").read_text().count("<details class=\"kernel\">") >= 1


def test_help_lists_inspect():
    r = subprocess.run([sys.executable, "-m", "compile_norm.cli", "inspect", "--help"],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 0 and "--hf-config" in r.stdout and "--bench" in r.stdout
    assert "--backend" not in r.stdout  # hidden: for tests


# --- Hugging Face configs ---------------------------------------------------------------------

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
              "num_hidden_layers": 3}


def test_hf_config_builds_random_model(tmp_path):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    for text in (str(cfg), json.dumps(TINY_LLAMA)):
        model, (ids,), title = targets.from_hf_config(text, layers=1, seq=10)
        assert model.model.config.num_hidden_layers == 1
        assert "llama" in title and ids.shape == (1, 10) and int(ids.max()) < 128
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (1, 10, 128) and torch.isfinite(logits).all()


def test_hf_config_unknown_model_type(capsys):
    pytest.importorskip("transformers")
    assert "cannot build" in _error(capsys, ["--hf-config", '{"model_type": "no_such_model"}'])


def test_hf_config_inspect(capsys):
    pytest.importorskip("transformers")
    cfg = json.dumps(TINY_LLAMA)
    rc = main(["inspect", "--hf-config", cfg, "--layers", "1", "--seq", "8",
               "--backend", STANDIN, "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    # input_layernorm, post_attention_layernorm and the final norm of one layer
    assert "compile_norm.rms_norm.default x3" in out
    assert "modeling_llama.py" in out
