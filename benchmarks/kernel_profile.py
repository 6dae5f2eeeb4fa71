"""Where a step's time goes: per-kernel time under ``torch.profiler``, by category.

``profile(fn, device)`` runs ``fn`` a few times (warm-up), then ``iters`` more under
``torch.profiler`` and returns a ``Profile``: every kernel's time and launch count per call of
``fn``, each kernel classified by its name (``classify``) into

- ``norm``: compile_norm's own Triton kernels (``norm_quant_kernel``, the backward's
  ``rms_norm_backward_kernel`` and ``dweight_reduce_kernel``), and kernels Inductor generated
  for a norm, a norm + quantization or a norm's backward (rules below);
- ``quant``: an activation quantization Inductor generated apart from any norm (stock
  Inductor's FP8 cast of a norm output, when it did not fuse it with the norm, and the inputs
  of o_proj / down_proj in both candidates);
- ``gemm``: cuBLAS / cuBLASLt / CUTLASS matmuls, Inductor's matmul templates, ATen's mm ops;
- ``attention``: flash / memory-efficient / cuDNN attention, flex attention templates;
- ``other``: everything else (copies, memsets, RoPE, SiLU, the loss, ...).

On CUDA the kernels are the profiler's device events (CUPTI). On the CPU (the benchmarks' dry
runs) they are the CPU events, each with its self time, so nested ATen calls are not counted
twice; Inductor's C++ kernels appear there only with ``cpp.enable_kernel_profile`` on, which
``naming("cpu")`` sets. Each kernel also gets its phase: ``backward`` where the CPU op that
launched it (on CUDA, found by the launch's correlation id) runs inside the autograd engine's
backward (``CompiledFunctionBackward``, ``autograd::engine::evaluate_function``), else
``forward``; a kernel whose launch has no CPU op on record counts as forward.

How Inductor's kernels are recognised. Inductor names a generated kernel
``triton_<red|per|poi|tem>_fused_<ops>_<n>`` (C++: ``cpp_fused_<ops>_<n>``), where ``<ops>``
depends on ``config.triton.descriptive_names`` (``cpp.descriptive_names`` for C++;
``torch/_inductor/utils.py: get_fused_kernel_name``):

- ``"torch"``: the Dynamo graph's functions (``source_fn_stack``; ``<fn>backward`` in a
  backward graph). Stock graphs read well (``rsqrt``, ``rsqrtbackward``), but compile_norm's
  training graph is re-traced before AOTAutograd and its nodes carry no source function, so
  its norm kernels come out as ``fused_Linear_2``: unrecognisable.
- ``"inductor_node"``: the post-grad node names (``mul_12``, ``rsqrt_default_2``): long,
  numbered, nothing a rule can rely on.
- ``"original_aten"`` (Inductor's default, used here): the highest-level ATen op of each node,
  sorted. compile_norm's ops keep their own names where AOTAutograd traced them
  (``fused_add_rms_norm``, ``rms_norm_backward`` in a training graph); where the post-grad
  passes built them the names are the reference's ATen ops, as stock's are.

``naming(device)`` pins that setting (and on the CPU turns the C++ kernel profile on) for the
compiles made inside it. The rules, in order, on the ops of a generated kernel's name:

1. a compile_norm op's name (from the op registry: ``rms_norm``, ``fused_add_rms_norm_fp8_group``,
   ``rms_norm_backward``, ...) -> norm, or quant for the ``quant_<scheme>`` ops;
2. ``rsqrt`` (a hand-written or decomposed RMSNorm forward: nothing else in these models takes
   an rsqrt) -> norm;
3. ``pow`` and ``sum`` (rsqrt's derivative ``-0.5 * g * rstd ** 3`` and dx's row sum) -> norm;
4. ``mul`` and ``sum`` and nothing but casts and views (the weight gradient's column sums of a
   stock norm backward, ``sum(dy * x * rstd, tokens)``) -> norm;
5. ``amax``, or ``clamp`` with ``_to_copy`` (an FP8 / INT8 cast) -> quant;
6. a template (``triton_tem_``) of ``mm`` / ``addmm`` / ``bmm`` / ``_scaled_mm`` -> gemm,
   of ``flex_attention`` -> attention; anything else generated -> other.

Limits, said plainly: a kernel Inductor fused across a norm and something else counts where
its name puts it (stock's first norm fused with the embedding and the position ids is norm; a
norm's backward fused with the embedding's backward is norm). Rules 3-4 hold for the models
benchmarked here (Llama, Gemma 3: their other reductions are the loss, GQA's head sums
(no ``mul``), RoPE); another model with a hand-written ``pow`` + ``sum`` or ``mul`` + ``sum``
reduction would have it counted as norm. Inductor does not truncate the names (torch 2.13's
source: ``kernel_name_max_ops`` is read nowhere); a torch that did would put kernels whose
norm ops were cut off in ``other``.
"""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

CATEGORIES = ("norm", "quant", "gemm", "attention", "other")
DESCRIPTIVE_NAMES = "original_aten"

# kernels that are not Inductor's, by name (any case); attention is tried before gemm
# (CUTLASS attention kernels are named fmha_cutlass*)
ATTENTION_RE = re.compile(r"flash|fmha|attention|sdpa", re.I)
GEMM_RE = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|splitk|cublas|^aten::(mm|addmm|bmm|_scaled_mm|baddbmm)$"
                     r"|mkldnn|onednn|dnnl", re.I)
GENERATED_RE = re.compile(r"^(?:triton_(?P<kind>[a-z]+)_|cpp_)fused_(?P<ops>.*?)(?:_\d+)?$")
BACKWARD_EVENTS = ("CompiledFunctionBackward", "autograd::engine::evaluate_function")
GRAPH_PREFIX_RE = re.compile(r"^graph_\d+_")
CASTS_AND_VIEWS = {"_to_copy", "view", "_unsafe_view", "expand", "clone", "permute", "squeeze",
                   "unsqueeze", "t", "transpose", "convert_element_type"}
GEMM_OPS = ("mm", "addmm", "bmm", "_scaled_mm", "baddbmm")


def _op_names(quant: bool) -> tuple[str, ...]:
    """compile_norm's op names: the quantization ops (``quant_<scheme>``) or all the others."""
    from compile_norm.ops import registry
    from compile_norm.ops.spec import Kind

    return tuple(s.name for s in registry.specs() if (s.kind is Kind.QUANT) == quant)


def _own_kernels() -> frozenset[str]:
    """The names compile_norm's Triton kernels launch under (eager and as Inductor's
    user-defined kernels)."""
    try:
        from compile_norm.kernels import triton_backward_kernel as B
        from compile_norm.kernels import triton_kernel as K
    except ImportError:  # no Triton: no such kernel can run
        return frozenset()
    return frozenset(k.fn.__name__ for k in (K.norm_quant_kernel, B.rms_norm_backward_kernel,
                                             B.dweight_reduce_kernel))


NORM_OPS, QUANT_OPS = _op_names(False), _op_names(True)
OWN_KERNELS = _own_kernels()


def _has(ops: str, op: str) -> bool:
    """``op`` is one of the ``_``-joined op names in ``ops`` (``sum`` is not in ``cumsum``)."""
    return f"_{op}_" in f"_{ops}_"


def _only(ops: str, allowed: set[str]) -> bool:
    """Every op in ``ops`` is in ``allowed`` (op names contain ``_``: strip the known ones)."""
    rest = f"_{ops}_"
    for op in sorted(allowed, key=len, reverse=True):
        while f"_{op}_" in rest:
            rest = rest.replace(f"_{op}_", "_", 1)
    return rest.strip("_") == ""


def _base_name(name: str) -> str:
    """A kernel's function name: ``void ns::kernel<...>(...)`` -> ``kernel``; the
    ``graph_<id>_`` prefix of Inductor's C++ kernel profile dropped."""
    base = name.split("(")[0].split("<")[0].strip().removeprefix("void ")
    base = GRAPH_PREFIX_RE.sub("", base)
    return base if base.startswith(("aten::", "compile_norm::")) else base.split("::")[-1]


def classify(name: str) -> str:
    """The category (one of ``CATEGORIES``) of a kernel named ``name``."""
    base = _base_name(name)
    if base in OWN_KERNELS or any(base.startswith(k + "_") for k in OWN_KERNELS):
        return "norm"
    m = GENERATED_RE.match(base)
    if m is None:
        if base.startswith("compile_norm::"):  # an op call kept in the graph (CPU events)
            op = base.split("::")[1].split(".")[0]
            return "quant" if op in QUANT_OPS else "norm"
        if ATTENTION_RE.search(name):
            return "attention"
        return "gemm" if GEMM_RE.search(name) else "other"
    ops = m["ops"]
    if any(_has(ops, op) for op in NORM_OPS):
        return "norm"
    if any(_has(ops, op) for op in QUANT_OPS):
        return "quant"
    if _has(ops, "rsqrt") or (_has(ops, "pow") and _has(ops, "sum")):
        return "norm"
    if _has(ops, "mul") and _has(ops, "sum") and _only(ops, CASTS_AND_VIEWS | {"mul", "sum"}):
        return "norm"
    if _has(ops, "amax") or (_has(ops, "clamp") and _has(ops, "_to_copy")):
        return "quant"
    if m["kind"] == "tem":
        if _has(ops, "flex_attention"):
            return "attention"
        if any(_has(ops, op) for op in GEMM_OPS):
            return "gemm"
    return "other"


def naming(device: str):
    """Compile inside this: generated kernels named by ``DESCRIPTIVE_NAMES`` (the setting the
    rules read); on the CPU, Inductor's C++ kernels recorded by the profiler (not on CUDA,
    where the setting would add a record_function around every Triton launch)."""
    return torch._inductor.config.patch({
        "triton.descriptive_names": DESCRIPTIVE_NAMES,
        "cpp.descriptive_names": DESCRIPTIVE_NAMES,
        "cpp.enable_kernel_profile": device == "cpu",
    })


@dataclass
class Kernel:
    name: str
    category: str
    us: float  # total time per call of the profiled function
    count: float  # launches per call
    phase: str = "forward"  # "backward": launched inside the autograd engine's backward


@dataclass
class Profile:
    device: str
    iters: int
    kernels: list[Kernel] = field(default_factory=list)  # most time first
    # GPU time with no kernel running, per call, and the kernels that waited longest for
    # their start (None on the CPU, which has no device timeline)
    idle_us: float | None = None
    idle_before: list[tuple[str, float]] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return sum(k.us for k in self.kernels)

    def by_category(self) -> dict[str, dict[str, float]]:
        """{category: {us, count, share}} for every category (share of the kernels' total)."""
        total = self.total_us or 1.0
        out = {c: dict(us=0.0, count=0.0, share=0.0) for c in CATEGORIES}
        for k in self.kernels:
            out[k.category]["us"] += k.us
            out[k.category]["count"] += k.count
        for c in out.values():
            c["share"] = c["us"] / total
        return out

    def top(self, n: int = 10) -> list[Kernel]:
        return self.kernels[:n]

    def of(self, category: str) -> list[Kernel]:
        return [k for k in self.kernels if k.category == category]

    def phases(self, category: str) -> dict[str, float]:
        """{forward: us, backward: us} of a category's kernels."""
        out = {"forward": 0.0, "backward": 0.0}
        for k in self.of(category):
            out[k.phase] += k.us
        return out

    def to_json(self, top: int = 10) -> dict:
        """Totals per category, the ``top`` kernels, and every norm kernel (forward and
        backward, so a reader sees which were counted)."""
        return dict(device=self.device, iters=self.iters, total_us=round(self.total_us, 2),
                    by_category={c: {k: round(v, 4) for k, v in d.items()}
                                 for c, d in self.by_category().items()},
                    top=[asdict(k) for k in self.top(top)],
                    norm_by_phase={k: round(v, 2) for k, v in self.phases("norm").items()},
                    norm_kernels=[asdict(k) for k in self.of("norm")],
                    idle_us=None if self.idle_us is None else round(self.idle_us, 2),
                    idle_before=[[n, round(us, 2)] for n, us in self.idle_before])


def idle_gaps(intervals, iters: int = 1, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """(idle us per call, [(kernel, us it waited per call)] longest first) of device kernel
    ``intervals`` (start us, end us, name): a gap is time after every earlier kernel ended and
    before the next one started, charged to the one that started. The gaps between calls
    (the host's sync and next launch) count too, alike for every candidate."""
    waited: dict[str, float] = collections.defaultdict(float)
    total, busy_until = 0.0, None
    for start, end, name in sorted(intervals):
        if busy_until is not None and start > busy_until:
            waited[name] += start - busy_until
            total += start - busy_until
        busy_until = end if busy_until is None else max(busy_until, end)
    longest = sorted(((n, us / iters) for n, us in waited.items()), key=lambda t: -t[1])[:top]
    return total / iters, longest


def _phase(event) -> str:
    """``backward`` for a CPU event inside a backward node's run (AOTAutograd's
    ``CompiledFunctionBackward``, any autograd engine ``evaluate_function``), else ``forward``."""
    while event is not None:
        if event.name.startswith(BACKWARD_EVENTS):
            return "backward"
        event = event.cpu_parent
    return "forward"


def _events(prof, cuda: bool):
    """(name, time in us, phase, (start, end) us or None) of every kernel: device events on
    CUDA (phase: the CPU op that launched it, by correlation id), CPU self times on the CPU."""
    from torch.autograd import DeviceType

    events = prof.events()
    ops = {e.id: e for e in events if e.device_type == DeviceType.CPU and not e.is_async}
    if cuda and events and not hasattr(events[0], "linked_correlation_id"):
        # a torch whose events do not name their launcher: the kernels each CPU op launched
        for op in ops.values():
            for k in op.kernels:
                yield k.name, k.duration, _phase(op), None
        return
    for e in events:
        if cuda and e.device_type == DeviceType.CUDA:
            # the event's own interval: device_time_total reads 0 without the profiler's use_device
            yield (e.name, e.time_range.elapsed_us(), _phase(ops.get(e.linked_correlation_id)),
                   (e.time_range.start, e.time_range.end))
        elif not cuda and e.device_type == DeviceType.CPU:
            yield e.name, e.self_cpu_time_total, _phase(e), None


def profile(fn: Callable[[], object], device: str, iters: int = 5, warmup: int = 2) -> Profile:
    """Run ``fn`` ``warmup`` times, then ``iters`` times under the profiler; its kernels."""
    from torch.profiler import ProfilerActivity

    if iters < 1 or warmup < 0:
        raise ValueError(f"profile: iters must be >= 1 and warmup >= 0, got {iters}, {warmup}")
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync()
    time: dict[tuple[str, str], float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    # keyed by phase too: the forward and the backward graph number their kernels alike
    intervals = []
    for name, us, phase, interval in _events(prof, cuda):
        time[name, phase] += us
        count[name, phase] += 1
        if interval is not None:
            intervals.append((*interval, name))
    kernels = [Kernel(n, classify(n), time[n, ph] / iters, count[n, ph] / iters, ph) for n, ph in time]
    kernels.sort(key=lambda k: -k.us)
    idle, before = idle_gaps(intervals, iters) if intervals else (None, [])
    return Profile(device, iters, kernels, idle, before)


def markdown(profiles: dict[str, Profile], top: int = 10, step_ms: dict[str, float] | None = None) -> list[str]:
    """Tables: time per category of each candidate side by side (us per call, share of the
    kernels' time, and of the step where its time is given), then each candidate's top kernels."""
    names = list(profiles)
    by = {n: p.by_category() for n, p in profiles.items()}
    lines = ["| category | " + " | ".join(f"{n} us (share)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(
            f"{by[n][c]['us']:.1f} ({by[n][c]['share']:.1%})" for n in names) + " |")
    lines.append("| kernels total | " + " | ".join(f"{profiles[n].total_us:.1f}" for n in names) + " |")
    phases = {n: p.phases("norm") for n, p in profiles.items()}
    if any(ph["backward"] for ph in phases.values()):
        lines.append("| norm forward / backward | " + " | ".join(
            f"{phases[n]['forward']:.1f} / {phases[n]['backward']:.1f}" for n in names) + " |")
    if step_ms and any(step_ms.values()):
        lines.append("| norm share of the step | " + " | ".join(
            f"{by[n]['norm']['us'] / (step_ms[n] * 1e3):.1%}" if step_ms.get(n) else "-" for n in names) + " |")
    if any(p.idle_us is not None for p in profiles.values()):
        lines.append("| GPU idle between kernels | " + " | ".join(
            "-" if profiles[n].idle_us is None else f"{profiles[n].idle_us:.1f}" for n in names) + " |")
    for n in names:
        if profiles[n].idle_before:
            lines += ["", f"Longest waits for a kernel's start, {n} (us per call):", ""]
            lines += [f"- `{k[:90]}`: {us:.1f}" for k, us in profiles[n].idle_before]
    for n in names:
        lines += ["", f"Top {top} kernels, {n}:", "", "| kernel | category | us | launches |", "|---|---|---|---|"]
        lines += [f"| `{k.name[:90]}` | {k.category}{' (bwd)' if k.phase == 'backward' else ''} | {k.us:.1f} | "
                  f"{k.count:g} |" for k in profiles[n].top(top)]
    return lines

