"""Device kernels registered as compile_norm providers.

``triton``: one fused Triton kernel for every op (``triton_ops``). Importing this package
never needs triton or a GPU: without them the providers are registered as unsupported,
with the reason (``compile_norm.ops.unsupported_reasons(op)``).
"""

from . import triton_ops

triton_ops.register()
