"""The training step ``inspect_model(train=True)`` runs: what requires grad, the loss, one
forward + backward, and the compiled step's loss and gradients against eager's.

The loss is the output's ``.loss`` where it has one (a tensor), else the sum in float32 of
every floating-point tensor of the output: deterministic, and every output element gets a
gradient. Gradients are compared per parameter group (the parameter names with their layer
indices written ``*``: ``layers.*.mlp.down_proj.weight`` is one group for every layer), by
``max |compiled - eager| / max |eager|`` over the group's gradients: a difference relative to
the gradient's scale, so that entries near zero do not make it noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from . import numerics
from .numerics import OutputCheck

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def group_of(name: str) -> str:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``"model.layers.*.mlp.up_proj.weight"``."""
    return _LAYER_INDEX.sub("*", name)


def trainable(model: Any, inputs: tuple, title: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter requiring grad; raises ValueError if neither a
    parameter nor an input tensor requires grad (the step would have no gradient to show)."""
    params = []
    if isinstance(model, torch.nn.Module):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params and not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        raise ValueError(f"cannot inspect a training step of {title}: no parameter and no input "
                         "tensor requires grad")
    return params


def _describe(out: Any) -> str:
    leaves = pytree.tree_leaves(out)
    if not leaves:
        return f"empty {type(out).__name__}"
    kinds = [f"{str(x.dtype).replace('torch.', '')} tensor" if isinstance(x, torch.Tensor)
             else type(x).__name__ for x in leaves[:4]]
    return ", ".join(kinds) + (", ..." if len(leaves) > 4 else "")


def loss_of(out: Any, title: str) -> tuple[torch.Tensor, str]:
    """(loss, how it was taken from ``out``); raises ValueError when ``out`` has no
    floating-point tensor or none that depends on what requires grad."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.is_floating_point():
        rule = "the output's .loss" + ("" if loss.dim() == 0 else " (summed)")
        loss = loss if loss.dim() == 0 else loss.sum()
    else:
        floats = [x for x in pytree.tree_leaves(out)
                  if isinstance(x, torch.Tensor) and x.is_floating_point()]
        if not floats:
            raise ValueError(f"cannot inspect a training step of {title}: its output has no "
                             f"floating-point tensor to take a loss from (it holds: "
                             f"{_describe(out)})")
        rule = ("sum of the float32 output" if len(floats) == 1 else
                f"sum of the float32 outputs ({len(floats)} floating-point tensors)")
        loss = sum(x.float().sum() for x in floats)
    if not loss.requires_grad:
        raise ValueError(f"cannot inspect a training step of {title}: its output does not "
                         "depend on any tensor requiring grad (was it computed under no_grad?)")
    return loss, rule


def _leaf(x: Any) -> Any:
    # a fresh copy per run (a model may write into its inputs), a leaf if the input wants a grad
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad)


@dataclass
class StepResult:
    out: Any
    loss: torch.Tensor
    rule: str
    grads: dict[str, torch.Tensor | None]


def step(fn: Callable, inputs: tuple, params: list[tuple[str, torch.Tensor]],
         title: str) -> StepResult:
    """``fn(*inputs)``, the loss, its backward; the gradients (parameters by name, inputs
    requiring grad as ``input[i]``), after which the parameters' ``.grad`` are cleared."""
    for _, p in params:
        p.grad = None
    args = tuple(_leaf(x) for x in inputs)
    out = fn(*args)
    loss, rule = loss_of(out, title)
    loss.backward()
    grads = {name: p.grad for name, p in params}
    grads.update({f"input[{i}]": a.grad for i, a in enumerate(args)
                  if isinstance(a, torch.Tensor) and a.requires_grad})
    for _, p in params:
        p.grad = None
    return StepResult(out, loss.detach(), rule, grads)


@dataclass
class GradCheck:
    group: str  # parameter names with layer indices as "*"
    params: int
    dtype: str
    max_abs: float  # max |compiled - eager| over the group
    max_rel: float  # max over the group of max |compiled - eager| / max |eager|
    rtol: float  # the limit on max_rel: the dtype's rtol (numerics.DEFAULT_TOLERANCES)
    ok: bool
    note: str = ""


@dataclass
class TrainStep:
    loss_rule: str
    trainable: int  # tensors requiring grad: parameters and inputs
    loss: OutputCheck
    eager_loss: float
    compiled_loss: float
    grads: list[GradCheck] = field(default_factory=list)
    no_grad: list[str] = field(default_factory=list)  # got no gradient, eager and compiled

    @property
    def ok(self) -> bool:
        return self.loss.ok and all(g.ok for g in self.grads)

    def worst(self) -> GradCheck | None:
        """The group to name first: a failed one, then the largest difference."""
        return max(self.grads, key=lambda g: (not g.ok, g.max_rel if g.max_rel == g.max_rel
                                              else float("inf")), default=None)

    def summary(self) -> str:
        """``"12 groups (22 tensors): max rel diff 2.1e-07 in layers.*.mlp.up_proj.weight: ok"``."""
        w = self.worst()
        if w is None:
            return "no gradient to compare"
        failed = [g.group for g in self.grads if not g.ok]
        n = sum(g.params for g in self.grads)
        verdict = "ok" if not failed else f"FAIL in {len(failed)} group(s): {', '.join(failed[:3])}"
        return (f"{len(self.grads)} groups ({n} tensors): max rel diff {w.max_rel:.3g} in "
                f"{w.group} (limit {w.rtol:g}): {verdict}")


def _rel(c: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    cf, ef = c.detach().double().cpu(), e.detach().double().cpu()
    diff = (cf - ef).abs().max().item() if ef.numel() else 0.0
    scale = ef.abs().max().item() if ef.numel() else 0.0
    if diff != diff or scale != scale:  # NaN on either side
        return float("nan"), float("nan")
    return diff, (diff / scale if scale else (0.0 if diff == 0 else float("inf")))


def compare(compiled: StepResult, eager: StepResult, trainable_count: int,
            tolerances: dict | None = None) -> TrainStep:
    tols = dict(numerics.DEFAULT_TOLERANCES)
    tols.update(tolerances or {})
    report = TrainStep(eager.rule, trainable_count,
                       numerics.compare_tensor("loss", compiled.loss, eager.loss, tols),
                       eager.loss.item(), compiled.loss.item())
    groups: dict[tuple[str, str], GradCheck] = {}
    for name, e in eager.grads.items():
        c = compiled.grads.get(name)
        if e is None and c is None:
            report.no_grad.append(name)
            continue
        ref = e if e is not None else c
        dtype = str(ref.dtype).replace("torch.", "")
        key = (group_of(name), dtype)
        g = groups.get(key)
        if g is None:
            g = groups[key] = GradCheck(key[0], 0, dtype, 0.0, 0.0, tols.get(ref.dtype, (0, 0))[1], True)
        g.params += 1
        if e is None or c is None or c.shape != e.shape:
            g.ok = False
            g.note = (f"{name}: " + ("no gradient in eager" if e is None else
                                     "no gradient compiled" if c is None else
                                     f"compiled shape {list(c.shape)}"))
            continue
        diff, rel = _rel(c, e)
        # max() keeps its first argument against a NaN: a NaN, once in, stays
        g.max_abs, g.max_rel = max(g.max_abs, diff), (max(g.max_rel, rel) if rel == rel else rel)
        g.ok = g.ok and rel <= g.rtol  # NaN fails
    report.grads = list(groups.values())
    return report
