"""The ``QUANT`` constexpr of ``triton_kernel.norm_quant_kernel`` for each scheme it implements.

Kept apart from the kernel so that which schemes have a kernel is known without importing
triton. A scheme not listed here runs on the reference (and generated code under compile).
"""

# Quantization modes (QUANT constexpr).
Q_NONE = 0
Q_FP8_STATIC = 1
Q_FP8_DYNAMIC = 2
Q_FP8_GROUP = 3
Q_INT8_STATIC = 4
Q_INT8_DYNAMIC = 5
Q_INT8_DYNAMIC_ASYM = 6
Q_MXFP8 = 7
# The modes whose scale the kernel computes from the row (or group): a second reduction, an
# amax, after the sum of squares (launch configs differ: triton_ops.launch_config).
AMAX_MODES = frozenset({Q_FP8_DYNAMIC, Q_FP8_GROUP, Q_INT8_DYNAMIC, Q_INT8_DYNAMIC_ASYM, Q_MXFP8})
# The scheme (compile_norm/ops/schemes/<name>.py) each mode implements.
QUANT_MODES = {
    "fp8_static": Q_FP8_STATIC,
    "fp8_dynamic": Q_FP8_DYNAMIC,
    "fp8_group": Q_FP8_GROUP,
    "int8_static": Q_INT8_STATIC,
    "int8_dynamic": Q_INT8_DYNAMIC,
    "int8_dynamic_asym": Q_INT8_DYNAMIC_ASYM,
    "mxfp8": Q_MXFP8,
}
