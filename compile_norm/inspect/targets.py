"""What ``compile-norm inspect`` inspects: a factory named on the command line, or a Hugging Face
model built from a config with random weights.

Every problem with the target raises ``TargetError`` with a one-line message for the user.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable

import torch


class TargetError(Exception):
    """A target that cannot be loaded or built; the message is shown to the user as is."""


def load_object(spec: str, what: str = "target") -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` -> the named object."""
    if ":" not in spec:
        raise TargetError(f"{what} {spec!r} must look like path/to/file.py:name or package.module:name")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise TargetError(f"{what} {spec!r} must look like path/to/file.py:name or package.module:name")
    if where.endswith(".py") or os.sep in where:
        module = _load_file(where, what)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise TargetError(f"{what}: cannot import module {where!r}: {e}") from None
        except Exception as e:  # noqa: BLE001  (user code raising on import)
            raise TargetError(f"{what}: importing {where!r} failed: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{what}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load_file(path: str, what: str):
    if not os.path.isfile(path):
        raise TargetError(f"{what}: no such file: {path}")
    path = os.path.abspath(path)
    # the file's folder goes on sys.path so it can import its neighbours (examples/_common.py)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "_compile_norm_target_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"{what}: loading {path} failed: {type(e).__name__}: {e}") from None
    return module


def from_factory(spec: str) -> tuple[Callable, tuple, str]:
    """Call the factory ``spec`` names; returns (model, inputs, title)."""
    factory = load_object(spec)
    if not callable(factory):
        raise TargetError(f"target {spec!r} is not callable (a factory returning (model, inputs))")
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"factory {spec!r} raised {type(e).__name__}: {e}") from None
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise TargetError(
            f"factory {spec!r} must return (model, example_inputs), got {type(made).__name__}"
            + (f" of length {len(made)}" if isinstance(made, (tuple, list)) else "")
        )
    model, inputs = made
    if not callable(model):
        raise TargetError(f"factory {spec!r} returned a model that is not callable: "
                          f"{type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise TargetError(f"factory {spec!r} must return example inputs as a tensor or a tuple, "
                          f"got {type(inputs).__name__}")
    return model, tuple(inputs), spec.rpartition(":")[2]


def parse_config(text: str) -> dict:
    """``--hf-config``: a JSON file or an inline JSON object with ``model_type``."""
    if text.lstrip().startswith("{"):
        source = "inline JSON"
        raw = text
    elif os.path.isfile(text):
        source = text
        with open(text) as f:
            raw = f.read()
    else:
        raise TargetError(f"--hf-config: {text!r} is neither a JSON file nor an inline JSON object")
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TargetError(f"--hf-config: bad JSON in {source}: {e}") from None
    if not isinstance(cfg, dict):
        raise TargetError(f"--hf-config: {source} must hold a JSON object")
    if "model_type" not in cfg:
        raise TargetError(f"--hf-config: {source} has no \"model_type\" (e.g. \"llama\", \"gemma2\")")
    return cfg


class _Logits(torch.nn.Module):
    """Calls a causal LM on input_ids without a KV cache and returns the logits only."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def from_hf_config(text: str, layers: int | None = None, batch: int = 1, seq: int = 32,
                   seed: int = 0) -> tuple[torch.nn.Module, tuple, str]:
    """A transformers model from a config, random weights (nothing downloaded), and input_ids."""
    cfg = parse_config(text)
    try:
        import transformers
    except ImportError:
        raise TargetError("--hf-config needs transformers: pip install 'compile_norm[hf]'") from None
    if layers is not None:
        if layers < 1:
            raise TargetError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    kind = cfg.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(kind, **cfg)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"--hf-config: transformers cannot build a {kind!r} config: {e}") from None
    torch.manual_seed(seed)
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError:  # not a causal LM (or no sdpa): the bare model
            model = transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"--hf-config: building the {kind!r} model failed: {e}") from None
    model.eval()
    vocab = getattr(config, "vocab_size", None) or 1000
    input_ids = torch.randint(0, vocab, (batch, seq))
    return _Logits(model), (input_ids,), f"{type(model).__name__} ({kind})"
