"""FP8 e4m3, static per-tensor scale: ``q = sat(x / scale)``.

``scale_form`` is how the scale is applied (``quant.SCALE_FORMS``): "divide" ``x / scale``,
"multiply" ``x * reciprocal(scale)``, "inverse" ``x * scale`` (the scale is an inverse
scale). The per-tensor dynamic scheme's second pass (kernels/two_pass.py) applies its scale
with the form that scheme computed it for.
"""

from __future__ import annotations

import torch

from .. import checks
from ..quant import (FP8_DTYPE, SCALE_FORMS, KernelQuant, QuantScheme, check_scale_form,
                     empty_q, f32, fp8_apply_scale)


def reference(x: torch.Tensor, scale: torch.Tensor, scale_form: str = "divide") -> torch.Tensor:
    return fp8_apply_scale(f32(x), scale.reshape(()), scale_form)


def check(op, x, scale, scale_form):
    checks.check_scale(op, "scale", scale, x)
    check_scale_form(op, scale_form)


SCHEME = QuantScheme(
    name="fp8_static",
    reference=reference,
    outputs=("q",),
    fake=lambda x, scale, scale_form="divide": empty_q(x, FP8_DTYPE),
    check=check,
    kernel=lambda x, scale, scale_form: KernelQuant(scale=scale,
                                                    scale_form=SCALE_FORMS.index(scale_form)),
    options={"scale_form": "divide"},
    example_args=lambda options, device: dict(  # an inverse scale is 448 / amax
        scale=torch.tensor(448.0 / 3.5 if options["scale_form"] == "inverse" else 3.5 / 448.0,
                           dtype=torch.float32, device=device),
        scale_form=options["scale_form"]),
    variants=({"scale_form": "multiply"}, {"scale_form": "inverse"}),
)
