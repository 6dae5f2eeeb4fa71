"""Generated kernels and library calls, read from Inductor's output code."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# ``triton_per_fused_add_0 = async_compile.triton('triton_per_fused_add_0', '''...''')`` and the
# C++ equivalent ``cpp_fused_mul_0 = async_compile.cpp_pybinding([...], '''...''')``.
_KERNEL = re.compile(r"^(\w+) = async_compile\.(\w+)\(", re.M)
_CALL = re.compile(r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")


@dataclass
class Kernel:
    name: str
    kind: str  # triton, cpp_pybinding, cuda, ...
    module: int  # index of the output-code module (one per compiled graph)
    source: str | None = None
    graph: int | None = None  # index of the recorded graph (InspectReport.graphs) it belongs to


def parse(codes: list[str], with_source: bool,
          owners: list[int | None] | None = None) -> tuple[list[Kernel], dict[str, int]]:
    """Kernels defined in each output module, and counts of library/fallback calls;
    ``owners[i]``: the recorded graph that module ``i`` was generated for."""
    kernels: list[Kernel] = []
    calls: Counter[str] = Counter()
    for i, code in enumerate(codes):
        for m in _KERNEL.finditer(code):
            src = None
            start = code.find("'''", m.end())
            end = code.find("'''", start + 3) if start >= 0 else -1
            if with_source and end > start >= 0:
                src = code[start + 3 : end].strip("\n")
            kernels.append(Kernel(m.group(1), m.group(2), i, src, owners[i] if owners else None))
        body = code[code.find("def call(") :] if "def call(" in code else ""
        calls.update(_CALL.findall(body))
    return kernels, dict(calls)
