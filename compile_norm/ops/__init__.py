"""The compile_norm IR ops (``torch.ops.compile_norm.*``), their references and dispatch.

Each op's public callable is here by name (``ops.rms_norm``, ``ops.rms_norm_fp8_group``, ...):
eager calls on plain tensors go straight to the chosen provider; traced calls record the
torch op.
"""

from . import registry
from .fused import *  # noqa: F401,F403
from .fused import FUSED_OPS
from .gated import rms_norm_gated, rms_norm_gated_ref
from .norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_add_rms_norm,
    rms_norm_add_rms_norm_ref,
    rms_norm_backward,
    rms_norm_backward_ref,
    rms_norm_ref,
)
from .quant import *  # noqa: F401,F403
from .quant import QUANT_OPS, SCHEMES
from .registry import (
    dispatch,
    providers,
    providers_priority,
    register_provider,
    set_priority,
    unsupported_reasons,
    which_provider,
)
from .spec import Kind, OpSpec
