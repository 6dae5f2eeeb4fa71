"""docs/errors.md stays true: every documented bad call raises the documented ValueError, in
eager and (op rows) under torch.compile(backend="compile_norm", fullgraph=True)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import compile_norm

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "errors.md"
ROW = re.compile(r"^\| (\d+) \| (\w+) \| [^|]+ \| `(.+)` \| `(.+)` \|$")


def rows():
    found = [ROW.match(line) for line in DOC.read_text().splitlines() if line.startswith("| ")]
    return [m.groups() for m in found if m]


ROWS = rows()


def namespace():
    return {
        "torch": torch,
        "compile_norm": compile_norm,
        "cn": torch.ops.compile_norm,
        "x": torch.randn(4, 64),
        "r": torch.randn(4, 64),
        "w": torch.randn(64),
        "s": torch.tensor(0.02),
        "wm": torch.randn(64, device="meta"),
        "sm": torch.tensor(0.02, device="meta"),
        "f": lambda t: t + 1,
    }


def value_error_in_chain(exc: BaseException) -> ValueError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ValueError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def test_table_is_parsed_and_large():
    assert len(ROWS) >= 20
    numbered = [l for l in DOC.read_text().splitlines() if re.match(r"^\| \d+ \|", l)]
    assert len(ROWS) == len(numbered), "a table row does not parse"
    assert [int(r[0]) for r in ROWS] == list(range(1, len(ROWS) + 1))
    assert {"op", "options", "fuse", "compile"} <= {r[1] for r in ROWS}


@pytest.mark.parametrize("num,kind,call,message", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_documented_call_raises_documented_message(num, kind, call, message):
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        eval(call, namespace())
    err = value_error_in_chain(info.value)
    assert err is not None, repr(info.value)[:500]
    assert message in str(err)


OP_ROWS = [r for r in ROWS if r[1] == "op"]


@pytest.mark.parametrize("num,kind,call,message", OP_ROWS, ids=[f"{r[0]}-op" for r in OP_ROWS])
def test_documented_op_call_raises_when_compiled(num, kind, call, message):
    ns = namespace()
    tensors = {k: v for k, v in ns.items() if isinstance(v, torch.Tensor)}
    # The call as the body of a compiled function whose inputs are the documented tensors.
    exec(f"def fn({', '.join(tensors)}):\n    return {call}\n", ns)
    torch._dynamo.reset()
    compiled = torch.compile(ns["fn"], backend="compile_norm", fullgraph=True)
    with pytest.raises(Exception) as info:
        compiled(*tensors.values())
    err = value_error_in_chain(info.value)
    assert err is not None, repr(info.value)[:500]
    assert message in str(err)


from test_ops_errors import CASES  # noqa: E402  (the 30 op cases of the eager/backend="eager" test)


@pytest.mark.parametrize("call,factories,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op_error_cases_under_compile_norm_backend(call, factories, text):
    tensors = [make() for make in factories]
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="compile_norm", fullgraph=True)
    with pytest.raises(Exception) as info:
        compiled(*tensors)
    err = value_error_in_chain(info.value)
    assert err is not None, repr(info.value)[:500]
    assert text in str(err)
