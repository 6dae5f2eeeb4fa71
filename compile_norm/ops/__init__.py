"""The compile_norm IR ops (``torch.ops.compile_norm.*``), their references and dispatch."""

from . import registry
from .fused import *  # noqa: F401,F403
from .fused import FUSED_OPS, add_norm_op_name, norm_op_name
from .norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_backward,
    rms_norm_backward_ref,
    rms_norm_ref,
)
from .quant import *  # noqa: F401,F403
from .quant import QUANT_OPS, SCHEMES, quant_op_name
from .registry import (
    dispatch,
    providers,
    providers_priority,
    register_provider,
    set_priority,
    unsupported_reasons,
    which_provider,
)
