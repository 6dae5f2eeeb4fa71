"""``compile-norm inspect``: argument parsing and the run, for compile_norm/cli.py.

Exit status: 0 done; 1 the compile failed or compiled outputs differ from eager beyond the
tolerance; 2 a bad target or argument (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .targets import TargetError

PREFIX = "compile-norm: error: "

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect",
        help="show what each compile_norm pass did to a model's graphs",
        description="Compile a model with the compile_norm backend and show the graph before and "
        "after each pass, which norm sites fused and why others did not, the generated kernels, "
        "compiled-vs-eager numerics and, with --bench, the time against stock torch.compile.",
    )
    p.add_argument("target", nargs="?", help="path/to/file.py:factory or package.module:factory; "
                   "the factory returns (model, example_inputs)")
    p.add_argument("--hf-config", metavar="PATH_OR_JSON", help="build a Hugging Face "
                   "transformers model with random weights from a config (a JSON file or inline "
                   "JSON with model_type) instead of TARGET")
    p.add_argument("--layers", type=int, help="with --hf-config: num_hidden_layers")
    p.add_argument("--seq", type=int, default=32, help="with --hf-config: tokens per sequence")
    p.add_argument("--code", action="store_true", help="include the generated kernels' source")
    p.add_argument("--bench", action="store_true", help="time against stock torch.compile")
    p.add_argument("--out", metavar="DIR", help="write stage graphs, report.json, report.html")
    p.add_argument("--depyf", action="store_true", help="with --out: a depyf dump in DIR/depyf")
    p.add_argument("--options", metavar="JSON", help="backend options as a JSON object")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the model and its floating "
                   "inputs")
    p.add_argument("--graphs", action="store_true", help="print every stage's graph too")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (symbolic "
                   "shapes), as a model serving many sequence lengths is")
    p.add_argument("--train", action="store_true", help="inspect a training step: train mode, "
                   "loss = the output's .loss or the sum of its float32 output, forward + "
                   "backward; shows the pre-grad, forward and backward graphs and the loss and "
                   "gradients against eager (--bench times the step)")
    p.add_argument("--backend", default="compile_norm", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=20, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(PREFIX + " ".join(str(msg).split()), file=sys.stderr)
    return code


def _reason(e: BaseException) -> str:
    """The innermost cause of a failed compile, whole: Dynamo and Inductor wrap it
    (BackendCompilerFailed, InductorError) in a message whose first line only says that the
    backend raised."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return f"{type(e).__name__}: {e}"


def _prepare(args):
    from . import targets

    if args.target and args.hf_config:
        raise TargetError("give either TARGET or --hf-config, not both")
    if not args.target and not args.hf_config:
        raise TargetError("give a TARGET (path/to/file.py:factory) or --hf-config")
    if args.depyf and not args.out:
        raise TargetError("--depyf needs --out DIR")
    if args.layers is not None and not args.hf_config:
        raise TargetError("--layers goes with --hf-config")
    if args.repeats < 1:
        raise TargetError(f"--repeats must be >= 1, got {args.repeats}")
    options = None
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise TargetError(f"--options: bad JSON: {e}") from None
        if not isinstance(options, dict):
            raise TargetError("--options must be a JSON object")
    backend = args.backend
    if backend == "compile_norm":  # before building the model and a compile of many seconds
        from ..options import parse_options

        try:
            parse_options(options)
        except ValueError as e:
            raise TargetError(f"--options: {e}") from None
    if ":" in backend:  # tests point at a stand-in backend function
        backend = targets.load_object(backend, "--backend")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TargetError("--device cuda: no CUDA device is available")
    if args.hf_config:
        model, inputs, title = targets.from_hf_config(args.hf_config, args.layers, seq=args.seq)
    else:
        model, inputs, title = targets.from_factory(args.target)
    dtype = _DTYPES.get(args.dtype)
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        model.train(args.train)
    inputs = tuple(
        x.to(device=device, dtype=dtype if dtype and x.is_floating_point() else x.dtype)
        if isinstance(x, torch.Tensor) else x
        for x in inputs
    )
    return model, inputs, title, options, backend


def run(args: argparse.Namespace) -> int:
    from .core import inspect_model

    try:
        model, inputs, title, options, backend = _prepare(args)
    except TargetError as e:
        return _fail(e)
    try:
        report = inspect_model(
            model, inputs, options=options, backend=backend, code=args.code, bench=args.bench,
            out_dir=args.out, depyf=args.depyf, repeats=args.repeats, title=title,
            dynamic=args.dynamic, train=args.train,
        )
    except ValueError as e:  # bad argument found by inspect_model (unknown backend, a target
        # that cannot train, ...)
        return _fail(e)
    except Exception as e:  # noqa: BLE001  (the compile itself failed)
        return _fail(f"compiling {title} with backend {args.backend!r} failed: {_reason(e)}", code=1)
    print(report.to_text(graphs=args.graphs))
    if args.out:
        print(f"report: {args.out}/report.html (stage graphs, report.json, report.txt beside it)")
    if not report.numerics_ok:
        what = "outputs, loss or gradients" if report.train else "outputs"
        print(f"compile-norm: compiled {what} differ from eager beyond the tolerance",
              file=sys.stderr)
        return 1
    return 0
