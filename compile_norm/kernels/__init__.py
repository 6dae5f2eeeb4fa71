"""Device kernels registered as compile_norm providers.

``triton``: one fused Triton kernel for every forward op (``triton_ops``); the backward of
rms_norm (``rms_norm_backward``) has its own (``triton_backward``). Importing this package
never needs triton or a GPU: without them the providers are registered as unsupported,
with the reason (``compile_norm.ops.unsupported_reasons(op)``).
"""

from . import triton_backward, triton_ops

triton_ops.register()
triton_backward.register()
