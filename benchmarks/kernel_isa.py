"""Instructions per element of the row kernel, read from its SASS for sm_90, on the CPU.

The quantizing kernels are issue bound on the H200 (benchmarks/RESULTS.md runs 6, 16): what
they cost is the instructions a warp issues per element, which this tool counts without a
GPU. For each family it builds the launch an eager call would make (``triton_ops.prepare``
on meta tensors of T x H, bf16: the default launch config, constexprs and arguments), lets
Triton's own binder specialize the arguments as a launch would (16-byte aligned pointers,
integers equal to 1 or divisible by 16), compiles for sm_90 with Triton's bundled ptxas and
disassembles the cubin with nvdisasm.

Per kernel: registers (cuobjdump), SASS instructions of the kernel body (subroutines and
the trailing padding left out), the hot path, and issued instructions per element by class.

- Hot path: from the entry, conditional branches fall through, except a branch around a
  block that calls a subroutine (the IEEE division's slow path, reached only when its
  ``FCHK`` fails); ``@P EXIT`` (rows past T) is not taken. So the static scale's exact
  branch (a scale outside the normal range) and every slow path are left out. The default
  launch has no loops (one row block per program, reductions unrolled); a back edge would
  be counted once and flagged ``loop`` in the table.
- Per element: every warp of a program issues the hot path once, so warp-instructions per
  element = hot instructions x warps / (rows per program x H). The table gives that x 32:
  instructions per element per thread, ncu's "instructions / element" of run 6.
- Classes by opcode: FP32 math (F*, MUFU, and the packed 16-bit H* math), conversion (F2F,
  F2FP, I2F, F2I, ...; PRMT, which here always packs or unpacks 8/16-bit lanes; and the
  bf16 -> fp32 idioms ``IMAD.U32 r, r, 0x10000`` / ``SHF.L.U32 r, r, 0x10`` (low half) and
  ``LOP3.LUT r, r, 0xffff0000`` (high half)),
  integer/address (integer ALU and the uniform datapath), predicate/select (compares,
  selects, predicate logic), memory (global, shared, constant), reduction/shuffle (SHFL,
  barriers), other (moves, special registers, control).

    python benchmarks/kernel_isa.py                         # every family, H 4096 and 5376
    python benchmarks/kernel_isa.py --families rms_fp8_static --hidden 4096 --sass $OUT
    python benchmarks/kernel_isa.py --configs all --hidden 5376     # launch_sweep's candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_check as G  # noqa: E402  (the benchmark families' op calls)
import new_schemes as N  # noqa: E402  (the gated families' op calls)

from compile_norm.kernels import checking, triton_ops  # noqa: E402
from compile_norm.ops import registry  # noqa: E402

# The suite's families, plus norm + dynamic per-token FP8 without the residual add.
FAMILIES = ("rms_norm", "gemma_rms_norm", "add_rms_norm", "rms_fp8_static", "rms_fp8_dynamic",
            "rms_fp8_group128", "rms_int8_dynamic", "add_rms_fp8_dynamic",
            "gated_qwen3_next", "gated_qwen3_next_fp8", "rms_mxfp8")
CLASSES = ("fp32", "convert", "int/addr", "pred/sel", "memory", "reduce/shfl", "other")


def family_call(family: str, tokens: int, hidden: int) -> tuple[str, tuple]:
    """(op name, positional arguments) of a family's call on meta tensors."""
    calls = {k: v["ref_op"] for k, v in G.families(tokens, hidden, dev="meta").items()}
    calls["rms_fp8_dynamic"] = ("rms_norm_fp8_dynamic", calls["rms_norm"][1])
    if family.startswith(("gated_", "rms_mxfp8")):  # as benchmarks/new_schemes.py calls them
        calls[family] = N.family(tokens, hidden, "meta", family)["ref_op"]
    op, args = calls[family]
    return op, tuple(checking.positional(op, args, {}))


# --- offline compile ---------------------------------------------------------------------------


def compile_sm90(launch: triton_ops.Launch, fn=None):
    """The CompiledKernel an H100 / H200 would run for ``launch`` (sm_90, no GPU needed);
    ``fn``: another JITFunction of the same signature (e.g. Inductor's copy of the kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = fn or triton_ops.kernel_module().norm_quant_kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    # MockTensor: a pointer of the tensor's dtype at address 0 (16-byte aligned, as torch's
    # allocations are)
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = dict(launch.const_kwargs(), num_warps=launch.num_warps)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def _on_cubin(cubin: bytes, argv: list[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        pathlib.Path(path).write_bytes(cubin)
        return subprocess.run([*argv, path], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> int:
    out = _on_cubin(cubin, [_tool("cuobjdump"), "-res-usage"])
    return int(re.search(r"REG:(\d+)", out).group(1))


def disassemble(cubin: bytes) -> str:
    return _on_cubin(cubin, [_tool("nvdisasm"), "-c"])


# --- SASS ----------------------------------------------------------------------------------------

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass
class Insn:
    opcode: str  # with modifiers, e.g. "LDG.E.EF.128"
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Block:
    insns: list
    succ: list  # (block index, is_branch_target)
    calls: bool = False


def kernel_body(sass: str, name: str = "norm_quant_kernel") -> list:
    """The kernel function's instructions and labels, in order (its subroutines, placed
    after it, and the self-branch + NOP padding at the end left out)."""
    out, inside = [], False
    for line in sass.splitlines():
        if line.startswith(f"{name}:"):
            inside = True
            continue
        if not inside:
            continue
        if line.strip().startswith((".weak", ".type", ".size")) or line.startswith("//---"):
            break
        if m := _LABEL.match(line):
            out.append(m.group(1))
        elif m := _INSN.match(line):
            out.append(Insn(m.group(3), m.group(4).strip(), m.group(2) is not None))
    # the end of the text: `.L: BRA .L` and NOPs
    while out and (isinstance(out[-1], str) or out[-1].base == "NOP"
                   or (out[-1].base == "BRA" and len(out) > 1 and out[-2] == _target(out[-1]))):
        out.pop()
    return out


def _target(insn: Insn) -> str | None:
    m = _TARGET.search(insn.operands)
    return m.group(1) if m else None


def blocks(body: list) -> list[Block]:
    """Basic blocks; successors are (index, taken-branch?) pairs."""
    out: list[Block] = []
    labels: dict[str, int] = {}
    cur: list = []
    for item in body:
        if isinstance(item, str):
            if cur:
                out.append(Block(cur, []))
                cur = []
            labels[item] = len(out)
            continue
        cur.append(item)
        if item.base in ("BRA", "EXIT", "RET"):
            out.append(Block(cur, []))
            cur = []
    if cur:
        out.append(Block(cur, []))
    for i, b in enumerate(out):
        last = b.insns[-1]
        b.calls = any(x.base == "CALL" for x in b.insns)
        falls = i + 1 < len(out)
        if last.base == "BRA":
            b.succ.append((labels[_target(last)], True))
            falls = falls and last.predicated
        elif last.base in ("EXIT", "RET"):
            falls = falls and last.predicated
        if falls:
            b.succ.append((i + 1, False))
    return out


def hot_path(bs: list[Block]) -> tuple[list[Insn], bool]:
    """The instructions of the path a warp takes when nothing is exceptional (module
    docstring), and whether it met a loop."""
    path, seen, i, loop = [], set(), 0, False
    while i is not None:
        if i in seen:
            loop = True
            break
        seen.add(i)
        b = bs[i]
        path += b.insns
        taken = [s for s, t in b.succ if t]
        fall = [s for s, t in b.succ if not t]
        if taken and fall:  # conditional: fall through unless that calls a slow path
            i = taken[0] if bs[fall[0]].calls else fall[0]
        elif taken or fall:
            i = (taken or fall)[0]
        else:
            i = None
    return path, loop


# a bf16 in the low half shifted up, or the high half masked: its fp32 value
_UNPACK = re.compile(r"^R\d+, R\d+(\.reuse)?, (0x10000, RZ|0x10, RZ|0xffff0000, RZ, 0xc0, !PT)$")


def insn_class(x: Insn) -> str:
    op, base = x.opcode, x.base
    if op in ("IMAD.U32", "SHF.L.U32", "LOP3.LUT") and _UNPACK.match(x.operands):
        return "convert"
    if base in ("F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP", "FRND", "PRMT"):
        return "convert"
    if base in ("SHFL", "BAR", "REDUX", "WARPSYNC", "MEMBAR", "VOTEU", "VOTE", "MATCH"):
        return "reduce/shfl"
    if base in ("LDG", "STG", "LDS", "STS", "LDC", "ULDC", "LD", "ST", "LDL", "STL", "ATOM",
                "ATOMS", "ATOMG", "RED", "LDSM", "LDGSTS", "LDGDEPBAR"):
        return "memory"
    if base in ("ISETP", "FSETP", "HSETP2", "PLOP3", "SEL", "FSEL", "P2R", "R2P", "PSETP",
                "UISETP", "USEL", "UPLOP3", "UP2UR", "UR2UP", "FCHK") or (
            base in ("LOP3", "ULOP3") and x.operands.startswith(("P", "UP"))):
        return "pred/sel"
    if base in ("FADD", "FMUL", "FFMA", "FMNMX", "MUFU", "FSWZADD", "FADD32I", "FMUL32I",
                "FFMA32I", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "DADD", "DMUL", "DFMA"):
        return "fp32"
    if base in ("IMAD", "IADD3", "LEA", "SHF", "LOP3", "IABS", "IMNMX", "VIADD", "VIADDMNMX",
                "IMUL", "POPC", "FLO", "BREV", "BMSK", "SGXT", "IDP", "IADD", "VIMNMX", "VIMNMX3") or (
            base.startswith("U") and base not in ("UMOV",)):
        return "int/addr"
    return "other"


# --- the report ----------------------------------------------------------------------------------


def analyse(family: str, tokens: int, hidden: int, config: triton_ops.LaunchConfig | None = None,
            fn=None) -> dict:
    """One kernel's report (``config``: a launch config in place of the default; ``fn``: see
    ``compile_sm90``)."""
    op, args = family_call(family, tokens, hidden)
    with triton_ops.launch_config_used(config):
        launch = triton_ops.prepare(registry.spec(op), args)
    block_m = launch.consts[0]
    kernel = compile_sm90(launch, fn)
    cubin = kernel.asm["cubin"]
    sass = disassemble(cubin)
    body = [x for x in kernel_body(sass) if isinstance(x, Insn)]
    path, loop = hot_path(blocks(kernel_body(sass)))
    per_elem = launch.num_warps * 32 / (block_m * hidden)  # x 32: per thread
    classes = Counter(insn_class(x) for x in path)
    cfg = config or triton_ops.launch_config(hidden, *triton_ops.launch_key(registry.spec(op), args))
    return dict(
        family=family, op=op, shape=f"{tokens}x{hidden}", config=_label(cfg),
        registers=registers(cubin), body=len(body), hot=len(path), loop=loop,
        per_element=len(path) * per_elem,
        classes={c: classes[c] * per_elem for c in CLASSES},
        opcodes=dict(Counter(x.opcode for x in path).most_common()),
        sass=sass,
    )


def _label(cfg: triton_ops.LaunchConfig) -> str:
    widths = "+".join(str(ng * g) for ng, g in cfg.tiles if ng)
    persistent = f" p{cfg.programs_per_sm}" if cfg.programs_per_sm else ""
    return f"m{cfg.block_m} w{cfg.num_warps} [{widths}]{persistent}"


def configs(which: str, family: str, hidden: int) -> list:
    """The launch configs to report: the default (None), the compile-time measurement's
    (``few_configs``) or every candidate of ``launch_sweep.py``."""
    if which == "default":
        return [None]
    op, args = family_call(family, 1, hidden)
    key = triton_ops.launch_key(registry.spec(op), args)
    if which == "few":
        return triton_ops.few_configs(hidden, *key)
    return triton_ops.candidate_configs(hidden, *key, persistent=False)


def table(rows: list[dict]) -> str:
    head = ["family", "T x H", "config", "regs", "SASS body", "hot path", "/ element"] + list(CLASSES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["family"], r["shape"], r["config"], str(r["registers"]), str(r["body"]),
                 str(r["hot"]) + (" (loop)" if r["loop"] else ""), f"{r['per_element']:.2f}"]
        cells += [f"{r['classes'][c]:.2f}" for c in CLASSES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--hidden", default="4096,5376")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--configs", choices=("default", "few", "all"), default="default",
                   help="launch configs: the default, the compile-time measurement's few, "
                   "or every one-shot candidate of launch_sweep.py (the persistent variant's "
                   "grid needs a GPU)")
    p.add_argument("--sass", default="", help="folder to write each kernel's SASS into")
    p.add_argument("--out", default="", help="folder for kernel_isa.md / kernel_isa.json")
    a = p.parse_args(argv)
    families = [f for f in a.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}; known: {', '.join(FAMILIES)}")
    rows = []
    for h in (int(v) for v in a.hidden.split(",")):
        for fam in families:
            for i, cfg in enumerate(configs(a.configs, fam, h)):
                rows.append(analyse(fam, a.tokens, h, cfg))
                if a.sass:
                    pathlib.Path(a.sass).mkdir(parents=True, exist_ok=True)
                    (pathlib.Path(a.sass) / f"{fam}_{h}_{i}.sass").write_text(rows[-1]["sass"])
    md = table(rows)
    print(md, end="")
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_isa.md").write_text(md)
        (out / "kernel_isa.json").write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "sass"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
