"""Pass 1: every hand-written or library RMSNorm in the post-grad graph -> one rms_norm node.

The pass walks the graph by hand from each ``rsqrt`` (or ``pow(v, -0.5)``) node instead of
using traced patterns: a norm comes in many equivalent spellings (cast or no cast, ``pow`` or
``mul``, ``mean`` or ``sum / n``, a slice for ``variance_size``, weight applied before or after
the down-cast, implicit dtype promotion, ``contiguous()`` clones), which would take dozens of
traced patterns, and a walk can say *why* a norm-like site was left alone, which a pattern that
silently fails to match cannot. ``eps`` is read from the graph as a value.

Matched shape (``cd`` = compute dtype, float32, or float64 for float64 input)::

    xf  = x.to(cd)              # absent when x is already cd
    var = mean(xf ** 2, -1, keepdim=True)     # or sum(...)/n, or over xf[..., :n]
    y   = xf * rsqrt(var + eps)               # or x * rsqrt(...) (T5: promotes x to cd)
    then one of
      A  y.to(x.dtype) [* w]    w of x.dtype (Llama, Mistral, Qwen, T5 with 16-bit weight)
      B  (y * w)[.to(x.dtype)]  w any float dtype <= cd, product in cd (Gemma ``1 + w.float()``,
                                F.rms_norm / nn.RMSNorm, OLMo2, T5 with fp32 weight and input)
      or nothing: the weightless norm.

Each becomes ``rms_norm(x_in, weight, eps, 0.0, variance_size)``. Its contract (DESIGN.md
section 3) computes ``y`` exactly as above, then ``(y.to(w.dtype) * w).to(x_in.dtype)``:
- A: ``w.dtype == x.dtype`` so this is the graph's round-then-multiply; ``x_in = x``.
- B: the weight passed is ``w`` up-cast to cd (a new cast node where the graph promoted it
  implicitly), so the product is the graph's cd product with one final rounding. Gemma's
  ``1 + w.float()`` node is passed as that cd weight with ``weight_offset=0.0`` (exact); the
  gemma pass folds it into ``weight_offset=1.0``.
- When the result stays in cd although x is 16-bit (no down-cast, or a down-cast with other
  users), ``x_in`` is the cd up-cast ``xf`` itself, so the op's output dtype is cd too.
``aten._fused_rms_norm`` nodes (left undecomposed on some devices / torch versions) become the
same op with the numerics of torch's decomposition (weight promoted to cd). ``options`` is not
used. Training forward graphs save rsqrt for the backward, so there the site is reported as
"intermediate used elsewhere" and left alone (rewriting would compute the reduction twice);
the backend's pre-grad pass (pre_grad.py) runs this pass before autograd for that reason.
A weight multiply that does not fit (another shape, a weight dtype the contract would round
differently) stays in the graph after a weightless rms_norm, which keeps numerics exact.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import GraphPass, PassResult

aten = torch.ops.aten
prims = torch.ops.prims

_CASTS = (prims.convert_element_type.default, aten._to_copy.default)
_ADDS = (aten.add.Tensor, aten.add.Scalar)
_MULS = (aten.mul.Tensor,)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_LOW = (torch.float16, torch.bfloat16)
_FLOATS = (*_LOW, torch.float32, torch.float64)
# torch's fused RMSNorm op; Inductor's decomposition table expands it, but a graph may hold it
# (MPS, other torch versions). Absent from older torch: then never matched.
_FUSED = getattr(getattr(aten, "_fused_rms_norm", None), "default", object())


class _Skip(Exception):
    """A norm-like site that cannot be rewritten without changing numerics."""


class _SymbolicSkip(_Skip):
    """A site left alone because a value it needs as a constant is symbolic (dynamic shapes):
    ``strict`` makes it an error, since the user asked for dynamic shapes and every norm."""


class NotFusedUnderDynamicShapes(RuntimeError):
    """Raised under ``strict`` for a ``_SymbolicSkip`` (the manager names the pass)."""


class CanonicalizePass(GraphPass):
    name = "canonicalize"

    def run(self, graph: Graph, options=None) -> PassResult:
        result = PassResult(self.name)
        order = {n: i for i, n in enumerate(graph.nodes)}
        # Each match erases only nodes of its own norm, never another seed.
        for node in [n for n in graph.nodes if _is_rsqrt(n) or n.target is _FUSED]:
            try:
                match = _match_fused(node) if node.target is _FUSED else _match(node, order)
            except _Skip as skip:
                if isinstance(skip, _SymbolicSkip) and getattr(options, "strict", False):
                    raise NotFusedUnderDynamicShapes(
                        f"{site(node)} left unfused under dynamic shapes: {skip}") from None
                result.skip(site(node), str(skip))
                continue
            if match is not None:
                _rewrite(graph, match)
                result.matched += 1
        return result


def site(node: Node) -> str:
    """``node`` and the model source line it came from (for skip reports)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    where = next((ln for ln in reversed(lines) if ln.startswith("File ")), "")
    if not where:
        return node.name
    code = lines[lines.index(where) + 1] if lines.index(where) + 1 < len(lines) else ""
    where = where.replace("File ", "", 1)
    return f"{node.name} at {where}: {code}" if code else f"{node.name} at {where}"


# ---- node helpers -------------------------------------------------------------------------


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _arg(n: Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _is_rsqrt(n: Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is aten.rsqrt.default:
        return True
    # ATen computes pow(v, -0.5) with its rsqrt kernel, bit for bit.
    return n.target is aten.pow.Tensor_Scalar and _arg(n, 1, "exponent") == -0.5


def _cast_dtype(n) -> torch.dtype | None:
    """Target dtype when ``n`` is a pure dtype cast, else None."""
    if not isinstance(n, Node) or n.op != "call_function" or n.target not in _CASTS:
        return None
    if n.target is aten._to_copy.default:
        extra = set(n.kwargs) - {"dtype", "layout", "device", "memory_format"}
        if extra or len(n.args) != 1 or n.kwargs.get("dtype") is None:
            return None
        if _val(n).device != _val(n.args[0]).device:
            return None
    return _dtype(n)


def _is_twin_cast(p, xf) -> bool:
    """``p`` is a second node casting the same tensor to the same dtype as ``xf``."""
    if p is None or p is xf or _cast_dtype(p) is None or _cast_dtype(xf) is None:
        return False
    return p.args[0] is xf.args[0] and _cast_dtype(p) == _cast_dtype(xf)


def _only_user(n: Node) -> Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _skip_clones(n: Node, chain: list[Node]) -> Node:
    """Step over value-preserving ``clone`` users (F.rms_norm's decomposition's .contiguous())."""
    while True:
        u = _only_user(n)
        if u is None or u.target is not aten.clone.default:
            return n
        chain.append(u)
        n = u


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _hidden(n: Node):
    return _val(n).shape[-1]


def _other(mul: Node, n: Node):
    """The other operand of the binary ``mul`` that has ``n`` as exactly one operand."""
    a, b = mul.args[0], mul.args[1]
    if a is n and b is not n:
        return b
    if b is n and a is not n:
        return a
    return None


# ---- matching -----------------------------------------------------------------------------


class _Match:
    def __init__(self):
        self.x_in: Node | None = None  # input of the new op
        self.weight: Node | None = None
        self.weight_cast: torch.dtype | None = None  # up-cast to insert for the weight
        self.eps = 0.0
        self.variance_size: int | None = None
        self.out: Node | None = None  # node whose uses the new op takes over
        self.dead: list[Node] = []  # matched nodes, erased once unused
        self.anchor: Node | None = None  # the rsqrt (source line for the new node)


def _mean_of_squares(r: Node):
    """``(sq, mean_nodes, eps)`` when ``r`` is rsqrt(mean(sq) [+ eps]), else None."""
    v = r.args[0]
    eps = 0.0
    nodes = []
    if isinstance(v, Node) and v.op == "call_function" and v.target in _ADDS:
        a, b = v.args[0], v.args[1]
        if _arg(v, 2, "alpha", 1) != 1:
            return None
        if isinstance(a, Node) and _is_number(b):
            v, eps = a, b
        elif isinstance(b, Node) and _is_number(a):
            v, eps = b, a
        elif isinstance(a, Node) and isinstance(b, Node) and _mean_parts(a) is not None:
            raise _tensor_eps_skip(b)
        else:
            return None
        nodes.append(r.args[0])
    parts = _mean_parts(v)
    if parts is None:
        return None
    sq, reduce_nodes, divisor = parts
    return sq, nodes + reduce_nodes, float(eps), divisor


def _tensor_eps_skip(eps: Node) -> _Skip:
    reason = "eps is a tensor, not a constant"
    while _cast_dtype(eps) is not None:
        eps = eps.args[0]
    v = _val(eps)
    if eps.op == "placeholder" and isinstance(v, torch.Tensor) and v.shape == () and (
        v.dtype == torch.float64
    ):
        # How torch.compile(dynamic=True) passes a float attribute such as eps. The
        # compile_norm backend has Dynamo specialize it (compile_norm/dynamic.py); another
        # backend's graph, or a torch without that hook, still gets here.
        return _SymbolicSkip(
            reason + " (a Python float made a graph input by dynamic=True?"
            " torch._dynamo.config.specialize_float=True keeps it a constant)"
        )
    return _Skip(reason)


def _mean_parts(v):
    """``(sq, nodes, divisor)`` for mean(sq, ...) or sum(sq, ...) / n, where sq is a square."""
    if not isinstance(v, Node) or v.op != "call_function":
        return None
    divisor = None
    nodes = [v]
    if v.target is aten.div.Tensor and _is_number(v.args[1]) and isinstance(v.args[0], Node):
        # Inductor lowers mean as sum / n, so a hand-written sum / n is the same computation.
        divisor = v.args[1]
        red = v.args[0]
        if red.op != "call_function" or red.target is not aten.sum.dim_IntList:
            return None
        nodes.append(red)
    elif v.target in (aten.mean.dim, aten.mean.default):
        red = v
    else:
        return None
    sq = red.args[0]
    if not _is_square(sq):
        return None
    return sq, nodes, divisor


def _is_square(n) -> bool:
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    if n.target is aten.pow.Tensor_Scalar:
        return _arg(n, 1, "exponent") == 2
    if n.target is aten.mul.Tensor:
        return n.args[0] is n.args[1] and isinstance(n.args[0], Node)
    return False


def _check_reduction(reduce: Node, sq: Node, divisor) -> None:
    ndim = _val(sq).dim()
    if reduce.target is aten.mean.default:
        dims, keepdim, dtype = list(range(ndim)), False, reduce.kwargs.get("dtype")
    else:
        dims = _arg(reduce, 1, "dim")
        keepdim = _arg(reduce, 2, "keepdim", False)
        dtype = _arg(reduce, 3, "dtype")
        dims = list(range(ndim)) if dims is None or len(dims) == 0 else list(dims)
    if sorted(d % ndim for d in dims) != [ndim - 1]:
        raise _Skip("reduction not over the last dim only")
    if not keepdim:
        raise _Skip("mean without keepdim")
    if dtype is not None:
        raise _Skip("reduction with an explicit dtype")
    if divisor is not None and not _same(_hidden(sq), divisor):
        raise _Skip(f"sum divided by {divisor}, not by the reduced size")


def _only_users(n: Node, allowed) -> None:
    for u in n.users:
        if u not in allowed:
            raise _Skip(f"intermediate used elsewhere ({n.name} is also used by {u.name})")


def _depends_on(n: Node, target: Node, order: dict) -> bool:
    """Whether ``n`` is computed from ``target`` (walks only nodes placed after ``target``)."""
    stop = order.get(target, -1)
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        if m is target:
            return True
        if m in seen or order.get(m, stop + 1) < stop:
            continue
        seen.add(m)
        todo.extend(m.all_input_nodes)
    return False


def _weight_of(mul: Node, y: Node, order: dict) -> Node | None:
    """The 1-D ``[hidden]`` float weight ``mul`` applies to ``y``, if it is that kind of mul."""
    if mul is None or mul.op != "call_function" or mul.target not in _MULS:
        return None
    w = _other(mul, y)
    wv = _val(w)
    if not isinstance(wv, torch.Tensor) or wv.dtype not in _FLOATS or wv.dim() != 1:
        return None
    if not _same(wv.shape[0], _hidden(y)) or wv.device != _val(y).device:
        return None
    if tuple(_val(mul).shape) != tuple(_val(y).shape) or _depends_on(w, y, order):
        return None
    return w


def _normalizes(r: Node, n: Node) -> bool:
    """``rsqrt`` node ``r``'s only use multiplies ``n`` (a norm of the slice ``n`` itself)."""
    y = _only_user(r)
    return y is not None and y.op == "call_function" and y.target in _MULS and _other(y, r) is n


def _factor_reason(r: Node, y: Node, p) -> str:
    """Why the statistic ``r`` = rsqrt(mean(x**2) + eps) is not a norm of x: what it feeds
    instead (a module that returns the factor alone, multiplied elsewhere)."""
    cast = _cast_dtype(y)
    if cast is not None and cast != _dtype(r):
        # DeepSeek V4 / GLM-5 style ``x * rsqrt(...).to(x.dtype)`` on 16-bit x
        return (f"rsqrt rounded to {str(cast).replace('torch.', '')} before it multiplies "
                "(the op multiplies in float32 and rounds once)")
    if p is not None:
        # HY V4 style ``F.linear(x, w) * rsqrt(...)``: the factor scales another tensor
        while isinstance(p, Node) and p.target in _VIEWS:  # the tensor, not its view
            p = p.args[0]
        what = p.target if isinstance(p, Node) and p.op == "call_function" else p
        return (f"rsqrt(mean(x**2) + eps) multiplies another tensor ({what}), not the "
                "normalized input: no op computes the factor alone")
    return "rsqrt does not multiply the normalized input"


def _match(r: Node, order: dict) -> _Match | None:
    found = _mean_of_squares(r)
    if found is None:
        return None  # an rsqrt of something else (LayerNorm's var_mean, ...): not a norm
    sq, stat_nodes, eps, divisor = found
    reduce = stat_nodes[-1]
    _check_reduction(reduce, sq, divisor)

    cd = _dtype(r)
    if cd not in (torch.float32, torch.float64):
        raise _Skip(f"statistics computed in {cd}, not float32")

    m = _Match()
    m.anchor, m.eps = r, eps
    base = sq.args[0]
    pre = [sq]  # nodes between xf and the statistics
    if base.op == "call_function" and base.target is aten.slice.Tensor and not _normalizes(r, base):
        # statistics over x[..., :n] of the x that is normalized: variance_size
        ndim = _val(base).dim()
        dim, start = _arg(base, 1, "dim", 0), _arg(base, 2, "start")
        end, step = _arg(base, 3, "end"), _arg(base, 4, "step", 1)
        if isinstance(end, torch.SymInt) or isinstance(_val(end), torch.SymInt):
            raise _SymbolicSkip("squares of x[..., :n] with a symbolic n")
        if dim % ndim != ndim - 1 or start not in (None, 0) or step != 1 or not _is_number(end):
            raise _Skip("squares of a slice other than x[..., :n]")
        pre.append(base)
        xf = base.args[0]
        if end < _hidden(xf):
            m.variance_size = int(end)
    else:
        xf = base
    if _dtype(xf) != cd:
        raise _Skip(f"squares of a {_dtype(xf)} tensor, statistics in {cd}")

    # x: the 16-bit tensor xf up-casts, when the contract would up-cast it the same way.
    x = None
    if cd == torch.float32 and _cast_dtype(xf) == cd and _dtype(xf.args[0]) in _LOW:
        x = xf.args[0]

    # y = xf * rsqrt. The other factor may be xf, a second identical up-cast (``x.float()``
    # written twice) or x itself (T5: promotion up-casts it exactly, the same value as xf).
    if not r.users:
        return None  # dead code
    y = _only_user(r)
    if y is None:
        raise _Skip(f"intermediate used elsewhere ({r.name} has {len(r.users)} users)")
    p = _other(y, r) if y.op == "call_function" and y.target in _MULS else None
    twin = _is_twin_cast(p, xf)
    if p is None or not (p is xf or twin or (x is not None and p is x)):
        raise _Skip(_factor_reason(r, y, p))
    if _dtype(y) != cd or tuple(_val(y).shape) != tuple(_val(xf).shape):
        raise _Skip("normalized value is not the input's shape in the compute dtype")

    inside = {*stat_nodes, r, y, *pre}
    for n in [*pre, *stat_nodes, r]:
        _only_users(n, inside)
    if twin:
        _only_users(p, {y})
    if x is not None:
        _only_users(xf, set(pre) | {y})
    # Users before their inputs, so each can be erased once the output is replaced.
    m.dead = [y, *([p] if twin else []), r, *stat_nodes, *pre]

    # The tail: weight and down-cast.
    tail: list[Node] = []
    end = _skip_clones(y, tail)
    m.x_in, m.out = xf, end
    nxt = _only_user(end)
    if x is not None and _cast_dtype(nxt) == _dtype(x):
        # A: y.to(x.dtype) [* w with w.dtype == x.dtype]
        tail.append(nxt)
        end = _skip_clones(nxt, tail)
        m.x_in, m.out = x, end
        mul = _only_user(end)
        w = _weight_of(mul, end, order)
        if w is not None and _dtype(w) == _dtype(x) and _dtype(mul) == _dtype(x):
            tail.append(mul)
            m.weight, m.out = w, mul
    else:
        # B: y * w in cd [.to(x.dtype)]
        w = _weight_of(nxt, end, order)
        if w is not None and _dtype(nxt) == cd and _dtype(w).itemsize <= cd.itemsize:
            tail.append(nxt)
            m.weight, m.out = w, nxt
            if _dtype(w) != cd:
                m.weight_cast = cd
            end = _skip_clones(nxt, tail)
            m.out = end
            down = _only_user(end)
            if x is not None and _cast_dtype(down) == _dtype(x):
                tail.append(down)
                m.x_in, m.out = x, down
    # Nodes between y and out each have one user (checked by the walk), so all are dead after.
    m.dead = [*reversed(tail), *m.dead]
    if m.x_in is x and x is not None:
        m.dead.append(xf)
    return m


def _match_fused(node: Node) -> _Match | None:
    """``aten._fused_rms_norm(x, [H], w, eps)[0]`` with the numerics of its decomposition:
    statistics in cd, ``(y * w)`` in cd (w promoted), ``.type_as(x)``."""
    x, shape, w = node.args[:3]
    eps = _arg(node, 3, "eps")
    outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if len(outs) != len(node.users) or not outs.get(0) or not outs[0].users:
        return None
    if len(shape) != 1:
        raise _Skip("normalizes more than the last dim")
    if 1 in outs and outs[1].users:
        raise _Skip(f"intermediate used elsewhere ({node.name}'s rstd is used)")
    xdt = _dtype(x)
    cd = torch.float64 if xdt == torch.float64 else torch.float32
    if xdt not in _FLOATS:
        raise _Skip(f"input dtype {xdt}")
    m = _Match()
    m.anchor, m.x_in, m.out = node, x, outs[0]
    m.eps = float(torch.finfo(cd).eps if eps is None else eps)
    if w is not None:
        if _dtype(w) not in _FLOATS or _dtype(w).itemsize > cd.itemsize:
            raise _Skip(f"weight dtype {_dtype(w)} wider than the compute dtype {cd}")
        m.weight = w
        m.weight_cast = cd if _dtype(w) != cd else None
    m.dead = [*outs.values(), node]
    return m


# ---- rewriting ----------------------------------------------------------------------------


def _fake_mode(v):
    mode = getattr(v, "fake_mode", None) or torch._guards.detect_fake_mode([v])
    return mode if mode is not None else contextlib.nullcontext()


def _rewrite(graph: Graph, m: _Match) -> None:
    op = torch.ops.compile_norm.rms_norm.default
    cast = prims.convert_element_type.default
    args = (m.eps, 0.0, m.variance_size)
    # Fake values first: if the op's argument check refused them, the graph is still intact.
    xv, wv = _val(m.x_in), _val(m.weight)
    with _fake_mode(xv):
        if m.weight_cast is not None:
            wv = cast(wv, m.weight_cast)
        out_val = op(xv, wv, *args)
    with graph.inserting_before(m.out):
        weight = m.weight
        if m.weight_cast is not None:
            weight = graph.call_function(cast, (weight, m.weight_cast))
            weight.meta["val"] = wv
        new = graph.call_function(op, (m.x_in, weight, *args))
    new.meta["val"] = out_val
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in m.anchor.meta:
            new.meta[key] = m.anchor.meta[key]
    m.out.replace_all_uses_with(new)
    for n in m.dead:
        if not n.users:
            graph.erase_node(n)


__all__ = ["CanonicalizePass", "site"]
