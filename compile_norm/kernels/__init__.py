"""Device kernels registered as compile_norm providers.

``triton``: one fused Triton kernel for every forward op (``triton_ops``; the per-tensor
dynamic FP8 ops as two launches of it, ``two_pass``); the backward of rms_norm
(``rms_norm_backward``) has its own (``triton_backward``). Importing this package
never needs triton or a GPU: without them the providers are registered as unsupported,
with the reason (``compile_norm.ops.unsupported_reasons(op)``).
"""

from . import triton_backward, triton_ops, two_pass

triton_ops.register()
triton_backward.register()
two_pass.register()  # per-tensor dynamic FP8: two launches of the row kernel
